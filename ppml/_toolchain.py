"""The C++ toolchain ppml._C is built with, and whether its C++ runtime is the one torch runs with.

A C++ error raised in ppml._C (a TORCH_CHECK on bad input) unwinds through torch's dispatcher to Python, where it
becomes a ValueError. That works when _C and torch share one C++ runtime (libstdc++ and the libgcc_s unwinder, loaded
once per process). An extension that brings its own copy (linked statically by a compiler that ships no shared
libstdc++, as some self-built toolchains under /opt do) throws with one runtime and is caught with another, and such
a process can die (SIGSEGV) instead of raising: what the first GPU run saw, with an extension built by /opt/gcc.

setup.py uses this module (loaded by path, before ppml is importable) to pick a compiler whose libstdc++ is the one
torch has loaded, to say so when none is, and to record what it used; ``python -m ppml._toolchain [path/to/_C.so]``
prints the same facts for a build already made (benchmarks/gpu_check.sh does). The build's self-test (setup.py) is
the arbiter: it makes _C raise a C++ error in a child process and fails the build if that crashes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

# Symbols that belong to a C++ runtime: an extension that defines them carries its own copy of that runtime.
RUNTIME_SYMBOLS = ("__cxa_throw", "__gxx_personality_v0", "_Unwind_RaiseException")


def _run(cmd: list[str], timeout: float = 30) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def loaded_libraries(prefixes=("libstdc++", "libgcc_s", "libgomp")) -> dict[str, str]:
    """Real paths of the runtime libraries this process has loaded, by name prefix (Linux; {} elsewhere).

    Import torch first: it is what loads them."""
    found: dict[str, str] = {}
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                name = os.path.basename(path)
                for prefix in prefixes:
                    if name.startswith(prefix + ".so") and prefix not in found:
                        found[prefix] = os.path.realpath(path)
    except OSError:
        pass
    return found


def compiler_info(command: str) -> dict:
    """What `command` is and which libstdc++ it links C++ code against (its real path, or None when it has no
    shared libstdc++ and would link the static one into the extension)."""
    path = shutil.which(command)
    info = {"command": command, "path": os.path.realpath(path) if path else None, "version": None, "libstdc++": None}
    if path is None:
        return info
    version = _run([path, "--version"])
    info["version"] = version.splitlines()[0].strip() if version else None
    lib = (_run([path, "-print-file-name=libstdc++.so"]) or "").strip()
    # A compiler without the shared library prints the bare name back.
    info["libstdc++"] = os.path.realpath(lib) if os.path.isabs(lib) and os.path.exists(lib) else None
    return info


def runtime_mismatch(info: dict, loaded: dict[str, str]) -> str | None:
    """None when the compiler links against the libstdc++ this process runs with, else what differs."""
    runtime = loaded.get("libstdc++")
    if info["path"] is None:
        return f"{info['command']} not found"
    if runtime is None:
        return None  # nothing to compare with (not Linux, or torch not imported)
    if info["libstdc++"] is None:
        return (f"{info['path']} has no shared libstdc++ (it would link its own static C++ runtime into ppml._C); "
                f"torch runs with {runtime}")
    if info["libstdc++"] != runtime:
        return f"{info['path']} links against {info['libstdc++']}; torch runs with {runtime}"
    return None


def _c_compiler_beside(cxx_path: str) -> str | None:
    """The C compiler of the same installation (nvcc's host compiler is passed as CC by torch's build)."""
    folder, name = os.path.split(cxx_path)
    for cand in (name.replace("g++", "gcc"), name.replace("c++", "gcc"), "gcc", "cc"):
        path = os.path.join(folder, cand)
        if cand != name and os.path.exists(path):
            return path
    return None


def pick_compiler(environ=os.environ) -> tuple[dict[str, str], str]:
    """Which compilers to build with: ``(variables to set, explanation)``.

    CXX given by the caller is kept (with a warning when its runtime differs from torch's). Otherwise the default
    ``c++`` is kept when its runtime is torch's; if it is not, the first of g++ / /usr/bin/c++ / /usr/bin/g++ whose
    runtime is torch's is used instead (CXX and, for nvcc's host side, CC).
    """
    loaded = loaded_libraries()
    if environ.get("CXX"):
        info = compiler_info(environ["CXX"])
        why = runtime_mismatch(info, loaded)
        return {}, f"CXX={environ['CXX']} ({info['version']})" + (f"; WARNING: {why}" if why else "")
    default = compiler_info("c++")
    why = runtime_mismatch(default, loaded)
    if why is None:
        return {}, f"c++ = {default['path']} ({default['version']}), the C++ runtime torch runs with"
    for cand in ("g++", "/usr/bin/c++", "/usr/bin/g++"):
        info = compiler_info(cand)
        if info["path"] and info["path"] != default["path"] and runtime_mismatch(info, loaded) is None:
            env = {"CXX": info["path"]}
            cc = _c_compiler_beside(info["path"])
            if cc and not environ.get("CC"):
                env["CC"] = cc
            return env, f"{info['path']} ({info['version']}) instead of c++: {why}"
    return {}, f"WARNING: no compiler found whose C++ runtime is torch's: {why}"


def extension_runtime(so_path: str) -> dict:
    """The shared libraries `so_path` needs and the C++ runtime symbols it defines itself (empty when it uses the
    process's runtime, as it should)."""
    dynamic = _run(["readelf", "-d", so_path]) or ""
    needed = [m.group(1) for m in re.finditer(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)]
    defined = set()
    for line in (_run(["nm", "--defined-only", so_path], timeout=120) or "").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "TtWw" and parts[2] in RUNTIME_SYMBOLS:
            defined.add(parts[2])
    return {"needed": needed, "defines_runtime": sorted(defined)}


def torch_compiler() -> str:
    """The compiler torch itself was built with, from torch.__config__."""
    import torch

    show = torch.__config__.show()
    gcc = re.search(r"^\s*- (GCC [\d.]+)", show, re.M)
    cxx = re.search(r"CXX_COMPILER=([^,]+)", show)
    return ", ".join(x for x in ((gcc and gcc.group(1)), (cxx and cxx.group(1).strip())) if x) or "unknown"


def report(so_path: str | None = None) -> str:
    import torch  # noqa: F401  (loads the runtime libraries this reports on)

    loaded = loaded_libraries()
    lines = [f"torch built with: {torch_compiler()}"]
    lines += [f"loaded {name}: {path}" for name, path in sorted(loaded.items())]
    for var in ("CC", "CXX"):
        lines.append(f"{var}={os.environ.get(var, '(unset)')}")
    for cmd in dict.fromkeys(("c++", "g++", "gcc", os.environ.get("CXX") or "c++")):
        info = compiler_info(cmd)
        why = runtime_mismatch(info, loaded)
        lines.append(f"{cmd}: {info['path']} ({info['version']}) libstdc++={info['libstdc++']}"
                     + (f" MISMATCH: {why}" if why else " (matches torch's runtime)"))
    lines.append(f"would build with: {pick_compiler()[1]}")
    if so_path:
        rt = extension_runtime(so_path)
        lines.append(f"{so_path} needs: {', '.join(rt['needed']) or '(readelf unavailable)'}")
        lines.append("it defines its own C++ runtime symbols: " + (", ".join(rt["defines_runtime"]) or "none (good)"))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(sys.argv[1] if len(sys.argv) > 1 else None))
