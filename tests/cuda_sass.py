"""What the compiled CUDA kernels of resnet_fast._C look like in SASS, without a GPU.

    python tests/cuda_sass.py                       # the built _C, sm_90: a table
    python tests/cuda_sass.py --json benchmarks/results/cuda_sass_sm90.json

Per kernel (cuobjdump -res-usage and --dump-sass of one architecture): registers, stack, local
memory (spills land there), shared memory; global loads by width, inside loops (a backward
branch's range) and outside; calls, and whether a call's target is the 64-bit integer division
routine (it starts with I2F.U64.RP) and whether it sits inside a loop. Used by
tests/test_cuda_sass.py, which holds the BatchNorm kernels to 128-bit loads in their loops, no
calls and no spills.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
WIDTH = {".128": 128, ".64": 64, ".U16": 16, ".S16": 16, ".U8": 8, ".S8": 8}


def find_cuobjdump() -> str | None:
    candidates = [shutil.which("cuobjdump"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                                         "cuobjdump")]
    try:
        import triton
        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def built_extension() -> Path | None:
    found = sorted((ROOT / "resnet_fast").glob("_C*.so"))
    return found[0] if found else None


def _run(*cmd) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _sections(text: str, arch: str) -> str:
    """The part of a cuobjdump listing that belongs to `arch`: a fat binary lists every
    architecture after an "arch = sm_XX" line; a bare cubin holds one."""
    if "\narch = " not in text:
        return text
    keep, out = False, []
    for line in text.splitlines():
        if line.startswith("arch = "):
            keep = line.split("=", 1)[1].strip() == arch
        if keep:
            out.append(line)
    return "\n".join(out)


def resource_usage(binary: Path, arch: str, cuobjdump: str) -> dict[str, dict[str, int]]:
    usage, name = {}, None
    for line in _sections(_run(cuobjdump, "-res-usage", str(binary)), arch).splitlines():
        match = re.match(r"\s*Function (\S+):", line)
        if match:
            name = match.group(1)
        elif name and "REG:" in line:
            usage[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            name = None
    return usage


def sass_functions(binary: Path, arch: str, cuobjdump: str) -> dict[str, list[tuple[int, str]]]:
    functions, name = {}, None
    for line in _sections(_run(cuobjdump, "--dump-sass", str(binary)), arch).splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            name = match.group(1)
            functions[name] = []
            continue
        match = INSTR.search(line)
        if name and match:
            functions[name].append((int(match.group(1), 16), match.group(2)))
    return functions


def _width(op: str) -> int:
    return next((bits for suffix, bits in WIDTH.items() if suffix in op.split()[0]), 32)


def analyse(instructions: list[tuple[int, str]]) -> dict:
    """Loads by width inside/outside loops, and the calls."""
    loops = []
    for addr, text in instructions:
        match = re.search(r"\bBRA\s+(?:`\(.*?\)\s*)?0x([0-9a-f]+)", text)
        if match and int(match.group(1), 16) <= addr:
            loops.append((int(match.group(1), 16), addr))

    def in_loop(addr):
        return any(lo <= addr <= hi for lo, hi in loops)

    loads = {"in_loops": {}, "outside": {}}
    calls = []
    for addr, text in instructions:
        op = re.sub(r"^@!?U?P\w+\s+", "", text)
        if op.startswith("LDG"):
            where = "in_loops" if in_loop(addr) else "outside"
            bits = str(_width(op))
            loads[where][bits] = loads[where].get(bits, 0) + 1
        if op.startswith("CALL"):
            target = int(re.search(r"0x([0-9a-f]+)", op).group(1), 16)
            callee = [t for a, t in instructions if a >= target][:40]
            calls.append({"at": hex(addr), "in_loop": in_loop(addr),
                          "int64_division": any("I2F.U64.RP" in t for t in callee)})
    return {"loops": len(loops), "loads": loads, "calls": calls}


def short_name(mangled: str) -> str:
    try:
        name = _run("c++filt", mangled).strip()
    except (OSError, subprocess.CalledProcessError):
        return mangled
    name = re.sub(r"\(anonymous namespace\)::|resnet_fast::|c10::|\(.*\)$|^void ", "", name)
    return (name.replace("BFloat16", "bf16").replace("Half", "fp16").replace("<float", "<fp32")
            .replace("<double", "<fp64").replace(" >", ">"))


def report(binary: Path, arch: str = "sm_90") -> dict[str, dict]:
    tool = find_cuobjdump()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (CUDA toolkit or triton's bundled copy)")
    usage = resource_usage(binary, arch, tool)
    out = {}
    for mangled, instructions in sass_functions(binary, arch, tool).items():
        kernel = re.search(r"([a-z][a-z_]*_kernel)I", mangled)
        vec = re.search(r"_kernelI.*?Li(\d)E", mangled)  # the first int template argument: VEC
        out[short_name(mangled)] = {"kernel": kernel.group(1) if kernel else mangled,
                                    "vec": int(vec.group(1)) if vec else None,
                                    "resources": usage.get(mangled, {}), **analyse(instructions)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", type=Path, help="a .so or .cubin (default: the built resnet_fast/_C*.so)")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--json", type=Path, help="also write the report, with command and environment, here")
    args = parser.parse_args(argv)
    binary = args.binary or built_extension()
    if binary is None:
        raise SystemExit("no resnet_fast/_C*.so: build it first (python setup.py build_ext --inplace)")
    kernels = report(binary, args.arch)
    for name, k in kernels.items():
        r = k["resources"]
        loads = " ".join(f"{w}b:{n}" for w, n in sorted(k["loads"]["in_loops"].items(), key=lambda x: -int(x[0])))
        calls = len(k["calls"])
        print(f"{name[:70]:70s} reg {r.get('REG', '?'):>3} stack {r.get('STACK', '?')} local {r.get('LOCAL', '?')} "
              f"smem {r.get('SHARED', '?'):>5}  loop loads [{loads}]  calls {calls}")
    if args.json:
        sys.path.insert(0, str(ROOT))
        from resnet_fast import envinfo
        record = {"command": " ".join(["python tests/cuda_sass.py", *(argv if argv is not None else sys.argv[1:])]),
                  "binary": str(binary), "arch": args.arch, "env": envinfo.collect(), "kernels": kernels}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
