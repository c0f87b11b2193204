"""One typed settings object for the whole product.

Built in one place (`Settings.load`) from, lowest priority first: defaults, an optional TOML file
(`--config`, `ASSISTANT_CONFIG`, or `<home>/config.toml`), environment variables prefixed
`ASSISTANT_`, and explicit overrides (CLI flags). It is then passed down explicitly; nothing else
reads the environment. Every path of state lives under `home`, so a test redirects everything by
setting one directory.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

ENV_PREFIX = "ASSISTANT_"
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_EMBEDDER = "embedded:all-minilm-l6-v2"


def default_home() -> Path:
    return Path.home() / ".assistant"


class Settings(BaseModel):
    """Everything configurable. Defaults run on a 2-core CPU with no network."""

    model_config = {"extra": "forbid", "protected_namespaces": ()}

    # --- state ---
    home: Path = Field(default_factory=default_home, description="Directory holding all state.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in home.")

    # --- serving ---
    host: str = Field("127.0.0.1", description="Bind address; 127.0.0.1 unless told otherwise.")
    port: int = 8000
    model: str = Field(EMBEDDED_MODEL, description="Base model: embedded id, HF hub id or folder.")
    model_name: str | None = Field(None, description="Public name of the base model in /v1/models.")
    backend: Literal["transformers", "openai"] = "transformers"
    openai_base_url: str | None = Field(None, description="Inference server for backend=openai.")
    openai_api_key: str = "not-needed"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    torch_threads: int | None = Field(None, description="torch threads for the server; None = torch default.")
    max_message_chars: int = Field(8000, description="Longest accepted user message.")
    max_history_messages: int = Field(200, ge=0, description="Most earlier messages an API request may send "
                                      "as history (400 past it).")
    max_history_chars: int = Field(200_000, ge=0, description="Most characters of history one API request may "
                                   "send, all messages together (413 past it).")
    max_new_tokens: int = 256
    max_tokens_limit: int = Field(1024, description="Largest max_tokens a request may ask for.")
    temperature: float = 0.7
    top_p: float = 0.9
    system_prompt: str = "You are a helpful assistant. Answer clearly and briefly."
    generation_timeout_s: float = Field(120.0, description="Seconds without a token before a stream fails.")
    stream_interval_ms: float = Field(40.0, ge=0, description="Streamed text leaves at most this often (the "
                                      "first piece at once); 0 = a piece per token.")
    cors_origins: list[str] = Field(default_factory=list, description="Other web origins allowed to call the API "
                                    "from a browser (no credentials); none by default.")
    queue_max: int = Field(32, description="Generations waiting for the model before 503.")
    queue_timeout_s: float = Field(60.0, description="Longest wait for the model before 503.")
    serving: Literal["batched", "sequential"] = Field(
        "batched", description="batched: requests decode together, each on its own adapter (continuous "
        "batching); sequential: one whole generation at a time.")
    batch_max: int = Field(16, ge=1, description="Most requests decoded together when serving=batched.")
    cuda_graphs: bool = Field(True, description="On CUDA, serving=batched decodes in a static slot cache, each "
                              "step one CUDA graph of the torch.compile'd forward; false = the eager step with a "
                              "growing cache. No effect on CPU.")

    # --- knowledge and memory ---
    embedder: str = Field(EMBEDDED_EMBEDDER, description="sentence-transformers model: embedded, hub id or folder.")
    chroma_url: str | None = Field(None, description="http://host:port of a `chroma run` server; None = embedded.")
    upload_max_bytes: int = 10 * 1024 * 1024
    max_document_chars: int = Field(400_000, description="Longest text one document may extract to (413 past it).")
    max_document_chunks: int = Field(1_000, description="Most chunks one document may make (413 past it).")
    synth_docs_dir: Path | None = Field(None, description="The one server folder (and its subfolders) admin "
                                        "synth may read .md/.txt files from; None = the knowledge base only.")
    chunk_tokens: int = 200
    chunk_overlap: int = 40
    retrieval_k: int = 4
    memory_k: int = 4

    # --- training ---
    train_threads: int = Field(1, description="torch threads for a CPU training process.")

    # --- personal adapters (each opted-in user's own adapter, trained on their own feedback) ---
    personal_adapters: bool = Field(False, description="Personal adapters for this installation: users may opt "
                                    "in, and each opted-in user is served their own adapter. Off by default.")
    personal_min_feedback: int = Field(20, ge=1, description="Feedback rows (ratings, edits, choices) a user needs "
                                       "before their first personal retrain.")
    personal_retrains_per_day: int = Field(1, ge=0, description="Personal retrains per user per day (UTC); 0 = none.")
    personal_disk_mb: int = Field(200, ge=1, description="Disk one user's personal adapters and datasets may use, "
                                  "in MiB; older versions are pruned past it, and no retrain starts while over.")

    # ------------------------------------------------------------------ derived paths
    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'assistant.db'}"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def chroma_dir(self) -> Path:
        return self.home / "chroma"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def personal_adapters_dir(self) -> Path:
        """One folder per user: `adapters/personal/<user_id>/u<user_id>-vNNNN/`."""
        return self.adapters_dir / "personal"

    @property
    def personal_datasets_dir(self) -> Path:
        """One folder per user: `datasets/personal/<user_id>/vNNNN/`."""
        return self.datasets_dir / "personal"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def uploads_dir(self) -> Path:
        """Files received from clients, one folder per user id (`uploads/<user_id>/`), removed after ingestion."""
        return self.home / "uploads"

    @property
    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        name = self.model.removeprefix("embedded:")
        return Path(name).name or name

    def ensure_dirs(self) -> None:
        for d in (self.home, self.models_dir, self.adapters_dir, self.datasets_dir, self.jobs_dir, self.uploads_dir):
            d.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        config_file: Path | str | None = None,
        env: dict[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Defaults < TOML file < ASSISTANT_* environment < explicit overrides (None = unset)."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        from_env = {
            k[len(ENV_PREFIX):].lower(): v
            for k, v in env.items()
            # ASSISTANT_CONFIG names the file; ASSISTANT_TEST_* belong to the test suite.
            if k.startswith(ENV_PREFIX) and k != ENV_PREFIX + "CONFIG" and not k.startswith(ENV_PREFIX + "TEST_")
        }
        unknown = set(from_env) - set(cls.model_fields)
        if unknown:
            raise ValueError(f"unknown settings in environment: {sorted(ENV_PREFIX + u.upper() for u in unknown)}")
        home = overrides.get("home") or from_env.get("home")
        path = config_file or env.get(ENV_PREFIX + "CONFIG")
        if path is None:
            candidate = Path(home) if home else default_home()
            if (candidate / "config.toml").is_file():
                path = candidate / "config.toml"
        if path is not None:
            with open(path, "rb") as f:
                values.update(tomllib.load(f))
        values.update(from_env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)
