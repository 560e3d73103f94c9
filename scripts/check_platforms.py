"""Does the tested set (constraints.txt) install on other machines? Resolve `ktr[test,quant]` for each target
platform with pip, wheels only, without such a machine (`pip install --dry-run --only-binary=:all: --platform
... --python-version ...`), and report every package, its pinned version, and whether a wheel exists there.

    python scripts/check_platforms.py --json docs/platforms.json

rouge-score is an sdist only (pure Python, builds anywhere); its own requirements are resolved in its place.
Prints a table (platform, Python, packages resolved, all wheels found, what failed) and writes JSON. It also
checks that `requires-python` is tight: the set does not resolve on the Python below its floor. torch is
resolved from the package index as a user on that platform would get it (pinned to constraints.txt's version).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_LINUX = [f"manylinux_2_{v}" for v in range(39, 16, -1)] + ["manylinux2014", "manylinux2010", "manylinux1"]
_MAC = [f"macosx_{v}_0" for v in range(15, 10, -1)]
_TAGS = {"macOS arm64": [f"{t}_arm64" for t in _MAC], "Linux aarch64": [f"{t}_aarch64" for t in _LINUX],
         "Linux x86-64": [f"{t}_x86_64" for t in _LINUX]}
PYTHONS = ("3.11", "3.12", "3.13", "3.14")
TARGETS = [(name, tags, py) for name, tags in _TAGS.items() for py in PYTHONS]
"""(name, pip --platform tags, python version): glibc 2.39 / macOS 15 and every older tag, each Python from
pyproject.toml's `requires-python` floor up."""
# torch is installed first, pinned, as a build that suits the machine (README); the accelerator libraries its
# platform build brings (CUDA wheels on Linux aarch64) are that build's, not part of ktr's tested set.
OWN_CLOSURE = {"torch"}
# Pure-Python packages published as an sdist only (no wheel anywhere): they build on any platform with no compiler,
# so they are checked through their own requirements (from their PKG-INFO / setup.py) instead.
PURE_SDIST = {"rouge-score": ["absl-py", "nltk", "numpy", "six>=1.14.0"]}
# environment markers the target sets (pip's --platform does not change how markers evaluate)
MARKERS = {"macOS arm64": ("Darwin", "arm64"), "Linux aarch64": ("Linux", "aarch64"),
           "Linux x86-64": ("Linux", "x86_64")}


def requirements(system: str, machine: str, python: str) -> list[str]:
    """ktr's dependencies plus its test and quant extras, markers evaluated for the target."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    env = {"platform_system": system, "platform_machine": machine, "sys_platform": system.lower(),
           "python_version": python, "python_full_version": python + ".0", "os_name": "posix"}
    out = []
    for line in project["dependencies"] + extras["test"] + extras["quant"]:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            out += PURE_SDIST.get(req.name, [str(req)])
    return out


def _wheels(names: list[str], pins: dict[str, str], tags: list[str], python: str) -> tuple[dict, str]:
    """One pip call, no dependencies: the wheel each pinned `name` has for the target, with its metadata."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--no-deps",
               "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
               "--target", str(Path(tmp) / "t"), "--report", str(report)]
        for tag in tags:
            cmd += ["--platform", tag]
        proc = subprocess.run(cmd + [f"{n}=={pins[n]}" for n in names], capture_output=True, text=True)
        if proc.returncode:
            return {}, _first_error(proc.stderr)
        return {_canon(i["metadata"]["name"]): i for i in json.loads(report.read_text())["install"]}, ""


def resolve(name: str, tags: list[str], python: str, pins: dict[str, str]) -> dict:
    """Walk ktr's dependency closure for the target: every requirement (markers evaluated for the target, not for
    this machine) must be pinned in constraints.txt, satisfied by its pin, and have a wheel for the target."""
    from packaging.requirements import Requirement

    system, machine = MARKERS[name]
    env = {"platform_system": system, "platform_machine": machine, "sys_platform": system.lower(),
           "python_version": python, "python_full_version": python + ".0", "os_name": "posix", "extra": ""}
    todo = [Requirement(r) for r in requirements(system, machine, python)]
    packages, problems, seen, brought = {}, [], set(), {}
    while todo:
        level = []
        for req in todo:
            key = _canon(req.name)
            if key not in pins:
                problems.append(f"{req} is not in constraints.txt")
            elif not req.specifier.contains(pins[key].split("+")[0], prereleases=True):
                problems.append(f"{req} excludes the pin {pins[key]}")
            elif key not in seen:
                seen.add(key)
                level.append(key)
        todo = []
        if not level:
            break
        found, error = _wheels(level, pins, tags, python)
        if error:  # find which one has no wheel
            for key in level:
                one, err = _wheels([key], pins, tags, python)
                if err:
                    problems.append(f"{key}=={pins[key]}: no wheel ({err})")
                found.update(one)
        for key, info in found.items():
            meta = info["metadata"]
            packages[key] = {"version": meta["version"], "wheel": info["download_info"]["url"].rsplit("/", 1)[-1]}
            for line in meta.get("requires_dist", []):
                dep = Requirement(line)
                if dep.marker is not None and not dep.marker.evaluate(env):
                    continue
                if key in OWN_CLOSURE and _canon(dep.name) not in pins:
                    brought.setdefault(key, []).append(str(dep))
                else:
                    todo.append(dep)
    return {"platform": name, "python": python, "tags": tags, "ok": not problems, "n_packages": len(packages),
            "packages": packages, "problems": problems, "sdist_only": sorted(PURE_SDIST),
            "brought_by_platform_build": brought}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _first_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("ERROR") and "Location" not in ln]
    return " | ".join(lines[:3])[:400]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    pins = {_canon(k): v for k, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "constraints.txt").read_text(),
                                                re.M)}
    results = [resolve(name, tags, py, pins) for name, tags, py in TARGETS]
    floor, below = python_floor()
    below_floor = resolve("Linux x86-64", _TAGS["Linux x86-64"], below, pins)
    print(f"{'platform':<15} {'python':<7} {'packages':>8} {'all wheels':>10}  torch wheel / problems")
    for r in results + [below_floor]:
        torch = r["packages"].get("torch", {}).get("wheel", "-")
        print(f"{r['platform']:<15} {r['python']:<7} {r['n_packages']:>8} {str(r['ok']):>10}  "
              f"{'; '.join(p[:160] for p in r['problems'][:3]) or torch}")
    tight = not below_floor["ok"] and min(PYTHONS, key=_version) == floor
    print(f"requires-python floor {floor}: the set {'does not resolve' if not below_floor['ok'] else 'RESOLVES'} "
          f"on {below} (the floor is {'tight' if tight else 'NOT tight'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"constraints": pins, "results": results, "requires_python_floor": {
            "floor": floor, "below": below, "below_resolves": below_floor["ok"],
            "below_problems": below_floor["problems"]}}, indent=1) + "\n")
    return 0 if all(r["ok"] for r in results) and tight else 1


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def python_floor() -> tuple[str, str]:
    """`requires-python`'s lower bound in pyproject.toml (`>=3.X`) and the minor version below it. The set must
    install on the floor and not below, so that pip names the Python as the reason instead of failing to resolve."""
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    major, minor = _version(re.fullmatch(r">=\s*(\d+\.\d+)", spec.strip()).group(1))
    return f"{major}.{minor}", f"{major}.{minor - 1}"


if __name__ == "__main__":
    sys.exit(main())
