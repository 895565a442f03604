#!/usr/bin/env python3
"""Writes the `layers` test image's hand-made layers as uncompressed tars, so each
tricky case (whiteouts, opaque dirs, hard links across layers, setuid, FIFO) is exact.
usage: make_layers.py OUT_DIR   -> OUT_DIR/layer2.tar, layer3.tar, layer4.tar"""
import io
import sys
import tarfile

MTIME = 1700000000


def entry(tar, name, kind=tarfile.REGTYPE, data=b"", mode=0o644, uid=0, gid=0, link=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = MTIME
    info.linkname = link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def layer(path, build):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)


def layer2(t):
    d = tarfile.DIRTYPE
    entry(t, "data", d, mode=0o755)
    entry(t, "data/keep.txt", data=b"kept from layer 2\n")
    entry(t, "data/gone.txt", data=b"deleted in layer 3\n")
    entry(t, "data/dir-gone", d, mode=0o755)
    entry(t, "data/dir-gone/a", data=b"a\n")
    entry(t, "data/dir-gone/sub", d, mode=0o755)
    entry(t, "data/dir-gone/sub/b", data=b"b\n")
    entry(t, "data/opaque", d, mode=0o755)
    entry(t, "data/opaque/old1", data=b"hidden by the opaque dir of layer 3\n")
    entry(t, "data/opaque/old2", data=b"hidden too\n")
    entry(t, "data/hl-src.txt", data=b"one inode, linked from layers 2 and 3\n")
    entry(t, "data/hl-same-layer", tarfile.LNKTYPE, link="data/hl-src.txt")
    entry(t, "data/link-rel", tarfile.SYMTYPE, link="keep.txt", mode=0o777)
    entry(t, "data/link-abs", tarfile.SYMTYPE, link="/etc/os-release", mode=0o777)
    entry(t, "data/link-dangling", tarfile.SYMTYPE, link="../nowhere/at/all", mode=0o777)
    entry(t, "data/fifo", tarfile.FIFOTYPE, mode=0o640)
    entry(t, "data/owned", data=b"owned by 1234:5678\n", mode=0o640, uid=1234, gid=5678)
    entry(t, "data/private", d, mode=0o700, uid=1234, gid=5678)
    entry(t, "data/private/secret", data=b"s\n", mode=0o600, uid=1234, gid=5678)
    entry(t, "usr/local/bin/setuid-id", data=b"#!/bin/sh\nexec id\n", mode=0o4755)
    entry(t, "usr/local/bin/setgid-id", data=b"#!/bin/sh\nexec id\n", mode=0o2755)


def layer3(t):
    d = tarfile.DIRTYPE
    entry(t, "data", d, mode=0o755)
    entry(t, "data/.wh.gone.txt")
    entry(t, "data/.wh.dir-gone")
    entry(t, "data/opaque", d, mode=0o755)
    entry(t, "data/opaque/.wh..wh..opq")
    entry(t, "data/opaque/new1", data=b"only file left in the opaque dir\n")
    entry(t, "data/keep.txt", data=b"kept, replaced in layer 3\n")
    # A hard link to a file that only an earlier layer holds.
    entry(t, "data/hl-later", tarfile.LNKTYPE, link="data/hl-src.txt")
    entry(t, "data/new-dir", d, mode=0o750)
    entry(t, "data/new-dir/file", data=b"new in layer 3\n")


def layer4(t):
    d = tarfile.DIRTYPE
    entry(t, "data", d, mode=0o755)
    entry(t, "data/gone.txt", data=b"back in layer 4 after its whiteout\n")
    entry(t, "data/new-dir", d, mode=0o750)
    entry(t, "data/new-dir/.wh.file")
    entry(t, "data/link-rel", tarfile.SYMTYPE, link="opaque/new1", mode=0o777)
    entry(t, "etc", d, mode=0o755)
    entry(t, "etc/layers-image", data=b"the layers test image\n")


if __name__ == "__main__":
    out = sys.argv[1]
    layer(f"{out}/layer2.tar", layer2)
    layer(f"{out}/layer3.tar", layer3)
    layer(f"{out}/layer4.tar", layer4)
