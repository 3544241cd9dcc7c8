"""Reads rendered Kubernetes manifests (stdin) and prints, as JSON, every Job's parallelism and
its containers' command, args and plain env values, so a test can run them as local processes.
"""

import json
import sys

import yaml


def main() -> None:
    jobs = []
    for doc in yaml.safe_load_all(sys.stdin):
        if not doc or doc.get("kind") != "Job":
            continue
        spec = doc["spec"]
        for container in spec["template"]["spec"]["containers"]:
            jobs.append({
                "job": doc["metadata"]["name"],
                "parallelism": spec.get("parallelism", 1),
                "argv": container.get("command", []) + container.get("args", []),
                "env": {e["name"]: e["value"] for e in container.get("env", []) if "value" in e},
            })
    json.dump(jobs, sys.stdout)


if __name__ == "__main__":
    main()
