"""Reads rendered Kubernetes manifests (stdin) and prints, as JSON, what a test needs to run them
as local processes: every Job's parallelism and its containers' command, args and env (values
taken from Secrets resolved), and every Deployment container's env plus the files its Secret
volumes mount (path -> content).
"""

import base64
import json
import sys

import yaml


def secret_data(docs):
    secrets = {}
    for doc in docs:
        if doc.get("kind") == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in doc.get("data", {}).items()}
            data.update(doc.get("stringData", {}))
            secrets[doc["metadata"]["name"]] = data
    return secrets


def env_of(container, secrets):
    env = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def mounted_files(pod, container, secrets):
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes.get(mount["name"], {}).get("secret")
        if secret:
            for key, value in secrets[secret["secretName"]].items():
                files[mount["mountPath"] + "/" + key] = value
    return files


def main() -> None:
    docs = [doc for doc in yaml.safe_load_all(sys.stdin) if doc]
    secrets = secret_data(docs)
    jobs, deployments = [], []
    for doc in docs:
        if doc.get("kind") not in ("Job", "Deployment"):
            continue
        spec = doc["spec"]
        pod = spec["template"]["spec"]
        for container in pod["containers"]:
            entry = {
                "name": doc["metadata"]["name"],
                "argv": container.get("command", []) + container.get("args", []),
                "env": env_of(container, secrets),
            }
            if doc["kind"] == "Job":
                entry["parallelism"] = spec.get("parallelism", 1)
                jobs.append(entry)
            else:
                entry["files"] = mounted_files(pod, container, secrets)
                deployments.append(entry)
    json.dump({"jobs": jobs, "deployments": deployments}, sys.stdout)


if __name__ == "__main__":
    main()
