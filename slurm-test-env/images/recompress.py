#!/usr/bin/env python3
"""Adds a copy of a tagged image to an OCI layout whose layers are zstd-compressed
(application/vnd.oci.image.layer.v1.tar+zstd), with the zstd command. skopeo 1.9 keeps
layers that are compressed already as they are, so it cannot make this image itself.
usage: recompress.py LAYOUT SRC_TAG DST_TAG"""
import gzip
import hashlib
import json
import os
import subprocess
import sys


def blob_path(layout, digest):
    return os.path.join(layout, "blobs", *digest.split(":", 1))


def write_blob(layout, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(blob_path(layout, digest), "wb") as f:
        f.write(data)
    return digest


def main(layout, src_tag, dst_tag):
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    name = "org.opencontainers.image.ref.name"
    src = next(m for m in index["manifests"] if m.get("annotations", {}).get(name) == src_tag)
    with open(blob_path(layout, src["digest"])) as f:
        manifest = json.load(f)
    for layer in manifest["layers"]:
        with open(blob_path(layout, layer["digest"]), "rb") as f:
            tar = gzip.decompress(f.read())
        data = subprocess.run(["zstd", "-q", "-c", "-10"], input=tar, stdout=subprocess.PIPE, check=True).stdout
        layer.update(mediaType="application/vnd.oci.image.layer.v1.tar+zstd",
                     digest=write_blob(layout, data), size=len(data))
    body = json.dumps(manifest).encode()
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": write_blob(layout, body),
            "size": len(body), "annotations": {name: dst_tag}}
    index["manifests"] = [m for m in index["manifests"] if m.get("annotations", {}).get(name) != dst_tag] + [desc]
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
