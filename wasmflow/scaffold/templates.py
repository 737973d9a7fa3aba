"""The templates `wasmflow new` offers, and what each needs to be tried at once.

A template is a directory under `templates/`: `src/main.rs` (the crate's source), `flow.yaml` (its entry
under `flows:`), `fixture.json` (an event to run it with) and, for templates that use models,
`models.yaml` (entries under `models:`). `__NAME__` in any of them is replaced by the agent's name.
The table here says what the directory cannot: a one-line description and how its fixture is run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

TEMPLATE_ROOT = Path(str(resources.files("wasmflow.scaffold") / "templates"))


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    event_name: Optional[str] = None  # `--event-name` for its fixture (None: the default, manual)
    github_fixtures: bool = False  # its fixture run answers GitHub calls from fixtures/github
    needs: tuple[str, ...] = field(default_factory=tuple)  # what to have before running it (models)

    @property
    def directory(self) -> Path:
        return TEMPLATE_ROOT / self.name

    def read(self, relative: str, name: str) -> Optional[str]:
        """A file of the template with `__NAME__` replaced, or None when the template has none."""
        path = self.directory / relative
        if not path.is_file():
            return None
        return path.read_text().replace("__NAME__", name)

    def run_command(self, name: str) -> str:
        """The `wasmflow run` command that runs the agent on its fixture."""
        command = f"wasmflow run {name} --event fixtures/{name}.json"
        if self.event_name:
            command += f" --event-name {self.event_name}"
        if self.github_fixtures:
            command += " --github-fixtures fixtures/github"
        return command


TEMPLATES: dict[str, Template] = {t.name: t for t in [
    Template("http", "an HTTP-triggered function answering JSON"),
    Template("github-bot", "reacts to issues, pull requests and comments through the GitHub host functions",
             event_name="issues", github_fixtures=True),
    Template("schedule", "a cron flow keeping state in kv"),
    Template("llm", "a chat with a language model over WASI-NN (llama.cpp) or an OpenAI-compatible endpoint",
             needs=("a chat model: `wasmflow models pull gemma` (or set WASMFLOW_CHAT_GGUF to a .gguf)",)),
    Template("embed", "embeddings and cosine similarity",
             needs=("an embedding model: `wasmflow models pull minilm` (or set WASMFLOW_EMBED_GGUF to a .gguf)",)),
]}
DEFAULT_TEMPLATE = "http"
