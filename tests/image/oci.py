"""Run a built image's commands as its pods run them, without a Docker daemon: buildah mounts the image's root
filesystem, runc (the OCI runtime Kubernetes nodes use) runs a process in it with the pod's security context.

What each container gets, as the operator renders the pods (``securityContext``, volumes):

* the image's user (``USER``, 10001) and environment, its entrypoint and working directory;
* a read-only root filesystem (``readOnlyRootFilesystem: true``), no capabilities (``drop: [ALL]``), no new
  privileges (``allowPrivilegeEscalation: false``);
* writable ``/tmp`` and ``/dev/shm`` as tmpfs (the pods' ``emptyDir`` volumes), and optional read-only binds
  (the pods' ConfigMap or model volumes);
* the host's network namespace, so a server inside listens on this machine's loopback (the test's clients reach it
  as a Service would reach a pod's port).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NO_CAPABILITIES = {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}


def buildah(*args: str) -> str:
    return subprocess.run(["buildah", *args], check=True, capture_output=True, text=True).stdout.strip()


def inspect(image: str) -> dict[str, Any]:
    """``buildah inspect`` of an image: its OCI and Docker configurations, its history."""
    return json.loads(buildah("inspect", "--type", "image", image))


@dataclass
class ImageConfig:
    """The parts of an image's OCI configuration a runtime applies."""

    user: str
    env: list[str]
    entrypoint: list[str]
    cmd: list[str]
    workdir: str
    labels: dict[str, str]

    @classmethod
    def of(cls, image: str) -> ImageConfig:
        cfg = inspect(image)["OCIv1"]["config"]
        return cls(user=cfg.get("User") or "0", env=cfg.get("Env") or [], entrypoint=cfg.get("Entrypoint") or [],
                   cmd=cfg.get("Cmd") or [], workdir=cfg.get("WorkingDir") or "/", labels=cfg.get("Labels") or {})

    def uid_gid(self) -> tuple[int, int]:
        """Numeric ``USER uid[:gid]`` only: what Kubernetes' ``runAsNonRoot`` can check without /etc/passwd."""
        uid, _, gid = self.user.partition(":")
        return int(uid), int(gid or uid)


@dataclass
class Mounted:
    """A working container of ``image`` whose root filesystem buildah has mounted at ``rootfs``."""

    image: str
    name: str = ""
    rootfs: str = ""
    config: ImageConfig = field(init=False)

    def __enter__(self) -> Mounted:
        self.config = ImageConfig.of(self.image)
        self.name = buildah("from", "--pull-never", "--name", f"pdserve-test-{uuid.uuid4().hex[:8]}", self.image)
        self.rootfs = buildah("mount", self.name)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["buildah", "umount", self.name], capture_output=True)
        subprocess.run(["buildah", "rm", self.name], capture_output=True)

    def runtime_spec(self, args: list[str], *, binds: dict[str, str] | None = None,
                     env: dict[str, str] | None = None, tmp_size: str = "4g") -> dict[str, Any]:
        """The OCI runtime spec of one container running ``args`` (after the image's entrypoint)."""
        uid, gid = self.config.uid_gid()
        mounts = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=1g"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            # The pods' /tmp emptyDir: caches, the converted bundled model, `pdserve up`'s KV folder.
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", f"size={tmp_size}"]},
            # The kubelet writes /etc/hosts into every pod; `localhost` must resolve.
            {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts", "options": ["rbind", "ro"]},
        ]
        for dest, src in (binds or {}).items():
            mounts.append({"destination": dest, "type": "bind", "source": src, "options": ["rbind", "ro"]})
        image_env = dict(e.split("=", 1) for e in self.config.env)
        return {
            "ociVersion": "1.0.2",
            "root": {"path": self.rootfs, "readonly": True},
            "hostname": "pdserve-test",
            "process": {
                "terminal": False, "user": {"uid": uid, "gid": gid, "additionalGids": [gid]},
                "args": self.config.entrypoint + args,
                "env": [f"{k}={v}" for k, v in {**image_env, **(env or {})}.items()],
                "cwd": self.config.workdir, "capabilities": NO_CAPABILITIES, "noNewPrivileges": True,
            },
            "mounts": mounts,
            # No network namespace: the host's, so the test reaches the servers on 127.0.0.1.
            "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
                      "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
                      "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]},
        }


class Container:
    """One runc container: ``start()`` it in the background, or ``run()`` it to completion."""

    def __init__(self, mounted: Mounted, args: list[str], *, entrypoint: list[str] | None = None,
                 **spec_kwargs: Any) -> None:
        self.id = f"pdserve-test-{uuid.uuid4().hex[:12]}"
        self.bundle = Path(tempfile.mkdtemp(prefix="pdserve-oci-"))
        spec = mounted.runtime_spec(args, **spec_kwargs)
        if entrypoint is not None:  # like `docker run --entrypoint`
            spec["process"]["args"] = entrypoint + args
        (self.bundle / "config.json").write_text(json.dumps(spec, indent=1))
        self.proc: subprocess.Popen[bytes] | None = None

    def run(self, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(["runc", "run", "--bundle", str(self.bundle), self.id], capture_output=True,
                                  text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        finally:
            self.delete()

    def start(self, log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(["runc", "run", "--bundle", str(self.bundle), self.id],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self.proc

    def stop(self, signal: str = "TERM", timeout: float = 60) -> int | None:
        """Send ``signal`` to the container's first process (as the kubelet does), wait, then remove it."""
        if self.proc is None:
            return None
        subprocess.run(["runc", "kill", self.id, signal], capture_output=True)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            subprocess.run(["runc", "kill", self.id, "KILL"], capture_output=True)
            return self.proc.wait(30)
        finally:
            self.delete()

    def delete(self) -> None:
        subprocess.run(["runc", "delete", "--force", self.id], capture_output=True)
        for f in self.bundle.iterdir():
            f.unlink()
        os.rmdir(self.bundle)
