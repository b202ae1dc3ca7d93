"""What `scripts/gpu_check.sh --offline` needs on a GPU host that reaches no package index.

This workplace's lent GPU machine (README "GPU check") has Python 3.12 with a CUDA build of
torch, NCCL, nvcc, CMake and about 190 packages of its own, and nothing can be fetched there:
what the project needs beyond that image travels with the working tree, at most 64 MiB a
call. This script, run here where PyPI answers, makes that folder (``.gpu-bundle/``,
git-ignored; name it in the call's ``carry``):

- ``wheels.tar.xz``: for Python 3.12 on x86-64 Linux, a wheel of every distribution the
  project's venv holds that the image lacks (the image's list: ``scripts/gpu_image_packages.txt``),
  at the venv's versions; torch, its CUDA libraries and Triton are the image's. The wheels
  are re-zipped *stored* (uncompressed) so that xz compresses their contents together:
  157 wheels, 78.9 MiB as downloaded, became a 38.2 MiB archive. MLflow's web UI (27 MB of JavaScript) is left
  out of MLflow's wheel (and its RECORD): the check never serves it. On the host, ``pip
  install --no-index --no-deps`` installs them as wheels (entry points, ``dvc`` included).
- ``horovod-0.28.1.tar.gz``: Horovod's sdist with slimflow's fixes applied here (the C++17
  standard, the idle-cycle patch: scripts/lib/horovod_build.sh ``horovod_fix_source``; its
  ``SLIMFLOW_FIXED`` file names them), so the host needs neither ``patch`` nor git; built there.
- with ``--horovod-wheel DIR``: the Horovod wheel a GPU build cached in ``DIR`` (a folder of
  the wheel cache, named by its key: Horovod and the patch, torch, Python, CUDA, compute
  capabilities), built on a copy of the image (README "GPU check"), as
  ``horovod-wheel/<key>/``, its library's debug sections stripped (20.8 MB -> 1.2 MB). A
  host whose own key is that one installs it instead of building (minutes of the call, and
  no compiler needed); one where it does not install or load builds the sdist after all.
- ``manifest.json``: the distributions, their versions and sizes, the bundle's size.

It prints the bundle's size beside the working tree's (tracked files and untracked ones git
does not ignore): together they must stay under the 64 MiB a call may carry.

    .venv/bin/python scripts/gpu_bundle.py             # -> .gpu-bundle/
    .venv/bin/python scripts/gpu_bundle.py --list      # what it would carry, nothing downloaded
    .venv/bin/python scripts/gpu_bundle.py --list-image   # what the project takes from the image (a copy of it needs them)
    .venv/bin/python scripts/gpu_bundle.py --image-packages MY_HOST.txt --python 3.11   # another host
    .venv/bin/python scripts/gpu_bundle.py --horovod-wheel ~/.cache/slimflow/wheels/horovod-0.28.1+idlecycle.<hash>-torch2.11.0-cp312-cu130-sm90
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as metadata
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE_PACKAGES = REPO / "scripts" / "gpu_image_packages.txt"
BUNDLE = REPO / ".gpu-bundle"
CARRY_LIMIT_MIB = 64
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
# Never carried: the image's torch stack, what the host builds (horovod) or installs from
# the checkout (slimflow), and the test suite's own tools (not pluggy: Prefect's server imports it).
NOT_CARRIED = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|horovod|slimflow|pytest.*|iniconfig|coverage|"
                         r"import-linter|grimp|psycopg2-binary|pip|setuptools|wheel)$")
# Inside MLflow's wheel: its web UI, which the check never serves.
MLFLOW_UI = "mlflow/server/js/"
# Horovod's version, fixes and their mark: the build's own (scripts/install.sh uses it too).
HOROVOD_LIB = REPO / "scripts" / "lib" / "horovod_build.sh"


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = IMAGE_PACKAGES) -> set[str]:
    """The image's distribution names (one or more a line; ``#`` starts a comment)."""
    names: set[str] = set()
    for line in path.read_text().splitlines():
        names.update(normalize(n) for n in line.split("#", 1)[0].split())
    return names


def carried(installed: dict[str, str], image: set[str]) -> dict[str, str]:
    """``{name: version}`` of the venv's distributions that the host needs and the image lacks."""
    return {name: version for name, version in sorted(installed.items())
            if normalize(name) not in image and not NOT_CARRIED.match(normalize(name))}


def expected_on_host(installed: dict[str, str], image: set[str]) -> dict[str, str]:
    """``{name: version}`` of the venv's distributions the project takes from the image (its
    torch stack aside): what a copy of the image needs to check a bundle on, at the venv's versions."""
    return {name: version for name, version in sorted(installed.items())
            if normalize(name) in image and not NOT_CARRIED.match(normalize(name))}


def venv_distributions() -> dict[str, str]:
    """This interpreter's distributions (run it with the project's venv): ``{name: version}``."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        found.setdefault(normalize(dist.metadata["Name"]), dist.version)
    return found


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True)


def download(wanted: dict[str, str], into: Path, python: str = PYTHON_VERSION) -> None:
    """A Python 3.12 x86-64 wheel of each; a distribution with only an sdist is built here
    (pure Python, e.g. DVC's antlr4-python3-runtime 4.9.3)."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    options = ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python,
               "--implementation", "cp", *platforms, "--platform", "any", "-d", str(into)]
    specs = [f"{name}=={version}" for name, version in wanted.items()]
    source = []
    try:
        _pip(*options, *specs)  # one call; where a wheel is missing, one call each finds which
    except subprocess.CalledProcessError:
        for spec in specs:
            try:
                _pip(*options, spec)
            except subprocess.CalledProcessError:
                source.append(spec)
    for spec in source:
        _pip("wheel", "-q", "--no-deps", "-w", str(into), spec)
        built = next(into.glob(f"{spec.split('==')[0].replace('-', '_')}-*.whl"), None)
        if built is None or not built.name.endswith("-py3-none-any.whl"):
            raise SystemExit(f"{spec}: no wheel for Python {python} on PyPI, and its sdist "
                             f"does not build a pure-Python one")


def rewrite_wheel(wheel: Path, out: Path, compression: int,
                  change: Callable[[str, bytes], bytes | None]) -> int:
    """``wheel`` re-zipped into ``out`` (``compression``), each member's bytes through
    ``change(name, data)`` (None: left out), RECORD made true again: a left-out member's
    line goes, a changed one's hash and size are rewritten. Returns the bytes left out."""
    left_out, records = 0, {}
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(out, "w", compression) as target:
        record = None
        for info in source.infolist():
            if info.filename.endswith(".dist-info/RECORD"):
                record = info
                continue
            data = source.read(info)
            kept = change(info.filename, data)
            left_out += len(data) - len(kept or b"")
            if kept is None:
                records[info.filename] = None
                continue
            if kept != data:
                digest = base64.urlsafe_b64encode(hashlib.sha256(kept).digest()).rstrip(b"=").decode()
                records[info.filename] = f"{info.filename},sha256={digest},{len(kept)}"
            info.compress_type = compression
            target.writestr(info, kept)
        if record is not None:  # last, with the members' final hashes and sizes
            lines = [records.get(line.split(",", 1)[0], line) for line in source.read(record).decode().splitlines()]
            record.compress_type = compression
            target.writestr(record, "".join(f"{line}\n" for line in lines if line is not None))
    return left_out


def restore(wheel: Path, out: Path) -> int:
    """``wheel`` re-zipped uncompressed into ``out`` (MLflow's: without its web UI, nor the
    UI's lines of RECORD). Returns the bytes left out."""
    return rewrite_wheel(wheel, out, zipfile.ZIP_STORED,
                         lambda name, data: None if name.startswith(MLFLOW_UI) else data)


def fixed_sdist(sdist: Path, work: Path) -> Path:
    """``sdist`` with slimflow's fixes applied (by scripts/lib/horovod_build.sh, as a build
    would) and marked so, re-packed under the same name in ``work``."""
    work.mkdir()
    with tarfile.open(sdist) as archive:
        archive.extractall(work, filter="data")
    (top,) = [p for p in work.iterdir() if p.is_dir()]
    _horovod_lib('horovod_fix_source "$1"; horovod_fixed_mark > "$1/$HOROVOD_FIXED_MARK"', str(top))
    out = work / sdist.name
    with tarfile.open(out, "w:gz") as archive:
        archive.add(top, arcname=top.name)
    return out


def _horovod_lib(script: str, *args: str) -> str:
    """``script`` run by bash with scripts/lib/horovod_build.sh sourced (``$1``...: ``args``); its output."""
    return subprocess.run(["bash", "-c", f'set -euo pipefail; source "{HOROVOD_LIB}"; {script}', "horovod", *args],
                          check=True, stdout=subprocess.PIPE, text=True).stdout.strip()


def without_debug_info(wheel: Path, out: Path) -> int:
    """``wheel`` re-zipped into ``out`` with its shared libraries' debug sections stripped
    (``strip --strip-debug``: code, data and CUDA's fatbins stay) and their RECORD lines
    made true again. Horovod's build keeps debug info: its NCCL library is 68.8 MB, 2.5 MB
    without. Returns the bytes left out."""
    with tempfile.TemporaryDirectory() as tmp:
        library = Path(tmp) / "library.so"

        def stripped(name: str, data: bytes) -> bytes:
            if not re.search(r"\.so(\.[0-9.]+)?$", name):
                return data
            library.write_bytes(data)
            subprocess.run(["strip", "--strip-debug", str(library)], check=True)
            return library.read_bytes()

        return rewrite_wheel(wheel, out, zipfile.ZIP_DEFLATED, stripped)


def check_horovod_wheel(folder: Path, python: str) -> Path:
    """The one wheel in ``folder``, a wheel cache folder whose name (its key) says this
    checkout's Horovod and patch and ``python``'s tag; otherwise ValueError naming the problem."""
    prefix = f"horovod-{_horovod_lib('echo $HOROVOD_VERSION+$(horovod_local_version)')}-"
    if not folder.is_dir():
        raise ValueError(f"--horovod-wheel {folder}: no such folder (a folder of the wheel cache, named by its key)")
    wheels = sorted(folder.glob("horovod-*.whl"))
    if len(wheels) != 1:
        raise ValueError(f"--horovod-wheel {folder}: {len(wheels)} horovod-*.whl there, not one")
    tag = "cp" + python.replace(".", "")
    if not folder.name.startswith(prefix) or f"-{tag}-" not in folder.name:
        raise ValueError(f"--horovod-wheel {folder}: its key is not this checkout's Horovod for Python {python} "
                         f"({prefix}torch<version>-{tag}-cu<CUDA>-sm<CC>): a wheel built from another patch "
                         "or for another Python would never be used")
    return wheels[0]


def tree_bytes(repo: Path = REPO) -> int:
    """The working tree a device call sends: tracked files, and untracked ones git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                           check=True, capture_output=True).stdout.split(b"\0")
    return sum((repo / n.decode()).stat().st_size for n in names if n and (repo / n.decode()).is_file())


def build(out: Path, image: Path = IMAGE_PACKAGES, python: str = PYTHON_VERSION,
          horovod_wheel: Path | None = None) -> dict:
    wanted = carried(venv_distributions(), image_packages(image))
    prebuilt = check_horovod_wheel(horovod_wheel, python) if horovod_wheel else None
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "horovod-wheel", ignore_errors=True)  # never a wheel of an earlier bundle
    partial = out / "wheels.tar.xz.partial"
    with tempfile.TemporaryDirectory() as tmp:
        fetched, stored = Path(tmp) / "fetched", Path(tmp) / "wheels"
        fetched.mkdir()
        stored.mkdir()
        download(wanted, fetched, python)
        left_out = sum(restore(w, stored / w.name) for w in sorted(fetched.glob("*.whl")))
        wheel_bytes = sum(w.stat().st_size for w in fetched.glob("*.whl"))
        with tarfile.open(partial, "w:xz", preset=9 | lzma.PRESET_EXTREME) as archive:
            archive.add(stored, arcname="wheels")
        wheels = sorted(w.name for w in stored.glob("*.whl"))
        _pip("download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp,
             f"horovod=={_horovod_lib('echo $HOROVOD_VERSION')}")
        sdist = fixed_sdist(next(Path(tmp).glob("horovod-*.tar.gz")), Path(tmp) / "fixed")
        shutil.copy2(sdist, out / sdist.name)
    partial.replace(out / "wheels.tar.xz")
    if prebuilt is not None:
        (out / "horovod-wheel" / prebuilt.parent.name).mkdir(parents=True)
        without_debug_info(prebuilt, out / "horovod-wheel" / prebuilt.parent.name / prebuilt.name)
    bundle_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {
        "python": python, "platforms": list(PLATFORMS), "distributions": wanted, "wheels": wheels,
        "wheels_bytes": wheel_bytes, "left_out": {"mlflow web UI bytes": left_out},
        "horovod_sdist": sdist.name, "bundle_bytes": bundle_bytes,
        "horovod_wheel": f"horovod-wheel/{prebuilt.parent.name}/{prebuilt.name}" if prebuilt else None,
        "image_packages": str(image),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BUNDLE, help="the bundle's folder (default .gpu-bundle/)")
    parser.add_argument("--list", action="store_true", help="print what would be carried; download nothing")
    parser.add_argument("--list-image", action="store_true",
                        help="print what the project takes from the image (torch aside): a copy of the image needs them")
    parser.add_argument("--image-packages", type=Path, default=IMAGE_PACKAGES,
                        help="the host's distribution names (default: the lent GPU image's, scripts/gpu_image_packages.txt)")
    parser.add_argument("--python", default=PYTHON_VERSION, help=f"the host's Python version (default {PYTHON_VERSION})")
    parser.add_argument("--horovod-wheel", type=Path, metavar="DIR",
                        help="also carry the Horovod wheel a GPU build cached in DIR (a wheel cache folder, named by its key)")
    args = parser.parse_args(argv)
    if not args.image_packages.is_file():
        parser.error(f"--image-packages {args.image_packages}: no such file (one distribution name or more a line)")
    if args.list or args.list_image:
        listed = (carried if args.list else expected_on_host)(venv_distributions(), image_packages(args.image_packages))
        for name, version in listed.items():
            print(f"{name}=={version}")
        return 0
    if args.horovod_wheel:
        try:
            check_horovod_wheel(args.horovod_wheel, args.python)  # before minutes of downloads
        except ValueError as err:
            parser.error(str(err))
        if not shutil.which("strip"):
            parser.error("--horovod-wheel needs binutils' strip (the wheel's library is carried without its debug info)")
    manifest = build(args.out, args.image_packages, args.python, args.horovod_wheel)
    mib = 1024 * 1024
    tree = tree_bytes()
    total = manifest["bundle_bytes"] + tree
    print(f"{args.out}: {len(manifest['wheels'])} wheels ({manifest['wheels_bytes'] / mib:.1f} MiB as downloaded) "
          f"in wheels.tar.xz, and {manifest['horovod_sdist']}"
          + (f" and {manifest['horovod_wheel']}" if manifest["horovod_wheel"] else "")
          + f": {manifest['bundle_bytes'] / mib:.1f} MiB; "
          f"with the working tree's {tree / mib:.1f} MiB: {total / mib:.1f} MiB of the {CARRY_LIMIT_MIB} MiB "
          "a device call may carry")
    if total > CARRY_LIMIT_MIB * mib:
        print(f"error: over the {CARRY_LIMIT_MIB} MiB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
