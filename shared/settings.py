"""Settings from the environment, all under the ``COVER_`` prefix (see README, "Settings")."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from platformdirs import user_cache_dir
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CACHE = Path(user_cache_dir("melodia-cover"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COVER_", extra="ignore")

    models_dir: Path = Field(DEFAULT_CACHE / "models", description="The local model store.")
    work_dir: Path = Field(DEFAULT_CACHE / "work", description="Scratch space for renders.")
    max_duration_s: float = Field(900.0, gt=0, description="Longest accepted song, seconds.")
    max_download_bytes: int = Field(500 * 2**20, gt=0, description="Largest accepted download.")
    device: str = Field("auto", description="'auto', 'cpu' or a torch device such as 'cuda:0'.")
    precision: str = Field("auto", pattern="^(auto|fp32|bf16)$",
                           description="Synthesizer compute type: auto (bf16 on CPUs with native bf16), fp32, bf16.")
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default.")
    allow_hub_download: bool = Field(
        False, description="Let Demucs fetch a named model from its public repo if not in the store."
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
