"""Where a served model's chat template comes from.

A model served over HTTP (SGLang, vLLM, llama.cpp) gets raw prompts rendered on our side
(`/v1/completions`), so the worker needs the model's own Jinja chat template. It is looked
up, first hit wins:

1. `TANDEM_<ROLE>_CHAT_TEMPLATE`: a `tokenizer_config.json`, a `chat_template.jinja` (or
   any template file), a model directory, or a GGUF file;
2. the template the server itself exposes (llama.cpp's `/props`);
3. the model the server reports (SGLang `/get_model_info` `tokenizer_path` and
   `model_path`; the ids of `/v1/models`), then the configured `TANDEM_<ROLE>_MODEL`: a
   local directory or GGUF file, or a Hugging Face repo id looked up in the hub cache the
   model server downloads into (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
   `~/.cache/huggingface/hub`; layout `models--org--name/snapshots/<rev>/`).

In a model directory `chat_template.jinja` wins over the `chat_template` key of
`tokenizer_config.json` (as in transformers), then `chat_template.json`; BOS and EOS come
from `tokenizer_config.json`. Nothing found is an error naming the setting: a served
model never silently gets a guessed (ChatML) template.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.core.backends.base import ConfigurationError

TEMPLATE_FILES = ("chat_template.jinja", "tokenizer_config.json", "chat_template.json")


class ChatTemplateNotFound(ConfigurationError):
    """No chat template could be found for a served model (the message names the setting)."""


@dataclass(frozen=True)
class ChatTemplate:
    text: str
    origin: str  # where it was found, for logs and errors
    bos_token: str = ""
    eos_token: str = ""


@dataclass(frozen=True)
class ServedModel:
    """What a model server says about itself."""

    ids: tuple[str, ...] = ()  # model / tokenizer paths or repo ids, most specific first
    template: str | None = None  # a template the server exposes (llama.cpp /props)
    bos_token: str = ""
    eos_token: str = ""


@dataclass(frozen=True)
class TemplateSource:
    """The lookup for one role; `resolve` runs it against what the server reports."""

    setting: str = "TANDEM_<ROLE>_CHAT_TEMPLATE"  # named in every error
    explicit: str | None = None  # the setting's value: a path
    configured_model: str | None = None  # TANDEM_<ROLE>_MODEL, when it names a model
    hub_dirs: tuple[Path, ...] = field(default_factory=lambda: hub_cache_dirs())

    @classmethod
    def for_role(
        cls,
        role: str,
        explicit: str | None,
        model: str | None,
        hf_hub_cache: str | None = None,
        hf_home: str | None = None,
    ) -> TemplateSource:
        return cls(
            setting=f"TANDEM_{role.upper()}_CHAT_TEMPLATE",
            explicit=explicit or None,
            configured_model=None if model in (None, "", "default") else model,
            hub_dirs=hub_cache_dirs(hf_hub_cache, hf_home),
        )

    @property
    def needs_server(self) -> bool:
        return self.explicit is None

    def resolve(self, served: ServedModel, where: str = "") -> ChatTemplate:
        if self.explicit is not None:
            return read_template_path(Path(self.explicit), self.setting)
        if served.template:
            return ChatTemplate(
                served.template, "the model server", served.bos_token, served.eos_token
            )
        candidates = list(dict.fromkeys([*served.ids, *filter(None, [self.configured_model])]))
        for model in candidates:
            found = find_model_template(model, self.hub_dirs)
            if found is not None:
                return found
        named = ", ".join(repr(m) for m in candidates) or "an unnamed model"
        searched = ", ".join(str(d) for d in self.hub_dirs) or "no hub cache"
        raise ChatTemplateNotFound(
            f"no chat template found for {named}{f' served at {where}' if where else ''} "
            f"(not a local model directory, nor in the Hugging Face cache {searched}): "
            f"set {self.setting} to the model's tokenizer_config.json or chat_template.jinja"
        )


def hub_cache_dirs(hf_hub_cache: str | None = None, hf_home: str | None = None) -> tuple[Path, ...]:
    """The Hugging Face hub caches to search, as huggingface_hub itself chooses them."""
    if hf_hub_cache:
        return (Path(hf_hub_cache).expanduser(),)
    if hf_home:
        return (Path(hf_home).expanduser() / "hub",)
    return (Path.home() / ".cache" / "huggingface" / "hub",)


def find_model_template(model: str, hub_dirs: Iterable[Path]) -> ChatTemplate | None:
    """The template of `model`: a local directory or GGUF file, or a repo id in a hub cache."""
    path = Path(model).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        try:
            return read_template_path(path, "")
        except ConfigurationError:
            return None
    if path.is_absolute() or model.count("/") > 1:
        return None  # a path that is not here (e.g. only on the model server's volume)
    for hub in hub_dirs:
        snapshot = _snapshot(hub / f"models--{model.replace('/', '--')}")
        if snapshot is not None:
            found = _from_directory(snapshot)
            if found is not None:
                return found
    return None


def read_template_path(path: Path, setting: str) -> ChatTemplate:
    """A template from a file or model directory the operator named; errors name `setting`."""
    hint = f" ({setting})" if setting else ""
    if path.is_dir():
        found = _from_directory(path)
        if found is None:
            raise ConfigurationError(
                f"{path} holds no chat template ({', '.join(TEMPLATE_FILES)}){hint}"
            )
        return found
    try:
        if path.suffix == ".gguf":
            return _from_gguf(path)
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigurationError(
            f"cannot read chat template {path}: {error.strerror or error}{hint}"
        ) from None
    if path.suffix != ".json":
        return ChatTemplate(
            text, str(path), *_special_tokens(path.with_name("tokenizer_config.json"))
        )
    try:
        config = json.loads(text)
    except ValueError:
        raise ConfigurationError(f"{path} is not valid JSON{hint}") from None
    template = _template_value(config) if isinstance(config, dict) else None
    if template is None:
        raise ConfigurationError(
            f"{path} has no chat_template: point at the model's tokenizer_config.json{hint}"
        )
    return ChatTemplate(template, str(path), *_tokens_of(config))


def _from_directory(directory: Path) -> ChatTemplate | None:
    specials = _special_tokens(directory / "tokenizer_config.json")
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return ChatTemplate(jinja.read_text(encoding="utf-8"), str(jinja), *specials)
    for name in ("tokenizer_config.json", "chat_template.json"):
        config = _json_file(directory / name)
        template = _template_value(config) if config is not None else None
        if template is not None:
            return ChatTemplate(template, str(directory / name), *specials)
    return None


def _snapshot(repo: Path) -> Path | None:
    """The snapshot `refs/main` points at, else the newest one."""
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file():
        pinned = snapshots / ref.read_text().strip()
        if pinned.is_dir():
            return pinned
    try:
        found = [p for p in snapshots.iterdir() if p.is_dir()]
    except OSError:
        return None
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _template_value(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next(
            (
                t.get("template")
                for t in template
                if isinstance(t, dict) and t.get("name") == "default"
            ),
            None,
        )
    return template if isinstance(template, str) and template.strip() else None


def _json_file(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _special_tokens(config_path: Path) -> tuple[str, str]:
    config = _json_file(config_path)
    return _tokens_of(config) if config is not None else ("", "")


def _tokens_of(config: dict[str, Any]) -> tuple[str, str]:
    def text(value: Any) -> str:
        if isinstance(value, dict):  # a serialised AddedToken
            value = value.get("content")
        return value if isinstance(value, str) else ""

    return text(config.get("bos_token")), text(config.get("eos_token"))


def _from_gguf(path: Path) -> ChatTemplate:
    """The template stored in a GGUF file's metadata (read with llama.cpp, vocabulary only)."""
    import llama_cpp

    try:
        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as error:
        raise ConfigurationError(f"cannot read chat template {path}: {error}") from None
    try:
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ConfigurationError(f"{path} has no tokenizer.chat_template in its metadata")

        def piece(token: int) -> str:
            return (
                llm.detokenize([token], special=True).decode("utf-8", "replace")
                if token >= 0
                else ""
            )

        return ChatTemplate(template, str(path), piece(llm.token_bos()), piece(llm.token_eos()))
    finally:
        llm.close()


def served_ids(values: Sequence[Any]) -> tuple[str, ...]:
    """The non-empty strings among what a server reported, in order, without repeats."""
    return tuple(dict.fromkeys(v for v in values if isinstance(v, str) and v.strip()))
