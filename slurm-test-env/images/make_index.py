#!/usr/bin/env python3
"""Adds a multi-platform image index to an OCI layout, as `docker buildx` publishes
them: an attestation manifest (platform unknown/unknown) first, then linux/arm64/v8,
then linux/amd64, so a client that takes the first entry gets it wrong.
usage: make_index.py LAYOUT AMD64_TAG ARM64_TAG INDEX_TAG"""
import hashlib
import json
import os
import sys

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def write_blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def tagged(index, tag):
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return {k: m[k] for k in ("mediaType", "digest", "size")}
    sys.exit(f"make_index.py: no tag {tag} in the layout")


def main(layout, amd64_tag, arm64_tag, index_tag):
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    amd64 = tagged(index, amd64_tag)
    arm64 = tagged(index, arm64_tag)
    statement = json.dumps({"_type": "https://in-toto.io/Statement/v0.1", "subject": [
        {"name": "minimal", "digest": {"sha256": amd64["digest"].split(":")[1]}}]}).encode()
    layer = dict(mediaType="application/vnd.in-toto+json", **write_blob(layout, statement),
                 annotations={"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"})
    config = dict(mediaType="application/vnd.oci.image.config.v1+json",
                  **write_blob(layout, json.dumps({"architecture": "unknown", "os": "unknown",
                                                   "rootfs": {"type": "layers", "diff_ids": []}}).encode()))
    attestation = dict(mediaType=OCI_MANIFEST, **write_blob(layout, json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [layer]}).encode()))
    image_index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        dict(attestation, platform={"architecture": "unknown", "os": "unknown"},
             annotations={"vnd.docker.reference.type": "attestation-manifest",
                          "vnd.docker.reference.digest": amd64["digest"]}),
        dict(arm64, platform={"architecture": "arm64", "os": "linux", "variant": "v8"}),
        dict(amd64, platform={"architecture": "amd64", "os": "linux"}),
    ]}
    desc = dict(mediaType=OCI_INDEX, **write_blob(layout, json.dumps(image_index).encode()),
                annotations={"org.opencontainers.image.ref.name": index_tag})
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != index_tag]
    index["manifests"].append(desc)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
