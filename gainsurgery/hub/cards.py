"""Model cards (README.md with YAML front matter) for merged models and gain files.

A card is published, so it claims only what is true and carries nothing that
could run or break out of it:

- ``base_model`` (which the Hub turns into a link and a model-tree edge) is
  written only for a Hub base: the repo of a Hub base or of a Hugging Face cache
  snapshot, an explicit ``--base-model ORG/NAME``, or the ``base_model`` a gain
  file records when the file also records a ``base_tensors_sha256`` (files made
  under these rules record ``base_model`` only for a Hub base). A local folder is
  never claimed (``checkpoints/final`` reads like a repo id but names nothing on the
  Hub); an embedded model is named in the text with its license and upstream.
- Repo ids are matched in full (:func:`gainsurgery.hub.refs.is_repo_id`).
- Every value taken from metadata (file names, methods, descriptions) is escaped:
  YAML values are JSON strings (ASCII, quoted), markdown text has HTML and markdown
  punctuation escaped, line breaks folded, length bounded (:func:`md_text`).

Example:
    >>> md_text("<script>x</script> | *bold*")
    '&lt;script&gt;x&lt;/script&gt; \\\\| \\\\*bold\\\\*'
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from gainsurgery.gainfile import BASE_TENSORS_KEY, format_count, stats
from gainsurgery.hub.refs import is_repo_id

#: Where the Hub reads a repo's model card.
CARD_NAME = "README.md"

PAPER = "arXiv 2604.04516 (GAIN: multiplicative modulation for domain adaptation)"
HUB_URL = "https://huggingface.co"

# Markdown punctuation that can start emphasis, code, links, tables or strikethrough mid-line.
_MD_PUNCT = re.compile(r"([\\`*_\[\]|~])")


def md_text(value: Any, max_chars: int = 300) -> str:
    """``value`` as inert markdown text on one line: HTML and markdown punctuation escaped.

    ``&``, ``<`` and ``>`` become entities (no raw HTML, no autolinks), markdown
    punctuation gets a backslash (no emphasis, code, links or table cells), line
    breaks and runs of blanks become one space (no new block, no break out of a
    table row), and the text is cut to ``max_chars`` characters.

    Example:
        >>> md_text("a\\n\\n# b")
        'a # b'
    """
    text = " ".join(str(value).split())
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_PUNCT.sub(r"\\\1", text)


def hub_id_or_none(value: object) -> str | None:
    """``value`` (without an ``@revision``) when it is exactly a Hub repo id (``org/name``), else None.

    Example:
        >>> hub_id_or_none("org/name@main"), hub_id_or_none("org/name\\n")
        ('org/name', None)
    """
    if not isinstance(value, str) or not value:
        return None
    value = value.split("@", 1)[0]
    return value if is_repo_id(value) else None


def _link(repo_id: str) -> str:
    """A markdown link to a Hub repo (``repo_id`` must pass :func:`is_repo_id`)."""
    return f"[{md_text(repo_id)}]({HUB_URL}/{repo_id})"


def _base_text(facts: Mapping[str, Any] | None) -> str:
    """A paragraph naming a non-Hub base's upstream model and license, or "" when unknown."""
    if not facts:
        return ""
    parts = []
    origin = hub_id_or_none(facts.get("upstream_origin"))
    upstream = hub_id_or_none(facts.get("upstream"))
    if origin or upstream:
        named = origin or upstream
        text = f"is {_link(named)}"  # type: ignore[arg-type]
        if upstream and upstream != named:
            text += f", taken from {_link(upstream)}"
        if facts.get("description"):
            text += f" ({md_text(facts['description'])})"
        parts.append(text)
    if facts.get("license"):
        name = md_text(facts.get("license_name") or facts["license"])
        link = facts.get("license_link")
        shown = f"[{name}]({link})" if isinstance(link, str) and re.fullmatch(r"https://[^\s()<>]+", link) else name
        parts.append(f"is distributed under the {shown} (license {md_text(facts['license'])}), "
                     "which applies to this model too")
    given = md_text(facts.get("given") or "The base model")
    return f"\nThe base model, {given}, " + "; it ".join(parts) + ".\n" if parts else ""


def _front_matter(fields: dict[str, Any]) -> str:
    """YAML front matter; every value a JSON string (ASCII-escaped, quoted), so nothing breaks out of it."""
    lines = ["---"]
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(str(v))}" for v in value)
        else:
            lines.append(f"{key}: {json.dumps(value if isinstance(value, (int, float)) else str(value))}")
    lines.append("---")
    return "\n".join(lines) + "\n"


def _tag(value: Any, default: str) -> str:
    text = str(value) if value else default
    return text if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,39}", text) else "custom"


def merged_model_card(provenance: Mapping[str, Any], *, provenance_file: str, base_model: str | None = None) -> str:
    """Model card for a folder produced by ``gainsurgery apply``.

    Args:
        provenance: the folder's provenance record (base, gain files, shards).
        provenance_file: the name of the file that holds it, cited in the card.
        base_model: the Hub id of the base (an explicit ``--base-model``, or a Hub
            base's repo); when None, the record's ``base.hub`` is used if it is one.
            Anything else gets no ``base_model``: a local folder is named by its
            folder name in the text only; an embedded base by its license and upstream.
    """
    base = provenance.get("base", {}) or {}
    base = base if isinstance(base, Mapping) else {}
    gains = provenance.get("gains")  # a hostile record may hold anything here: only a list of objects counts
    gains = [g for g in gains if isinstance(g, Mapping)] if isinstance(gains, list) else []
    base_model = hub_id_or_none(base_model) or hub_id_or_none(base.get("hub"))
    base_shown = base.get("given") or base.get("hub") or base.get("local") or "the base model"
    method = _tag(provenance.get("method"), "gain")
    fields = {
        "base_model": base_model,
        "base_model_relation": "merge" if base_model else None,
        "license": base.get("license"),
        "library_name": "transformers",
        "tags": ["gainsurgery", "gain", method, "merge"],
    }
    rows = "\n".join(
        f"| {md_text(g.get('name'), 120)} | {md_text(g.get('method') or '?', 40)} | "
        f"{md_text(g.get('parameters'), 20)} | {md_text(str(g.get('sha256'))[:16], 16)} |"
        for g in gains
    )
    title = base_model or md_text(base_shown, 120)
    return (
        _front_matter(fields)
        + f"""
# {title} + GAIN ({method})

This checkpoint is {md_text(base_shown, 200)} with {len(gains)} GAIN gain file(s) absorbed into its
weights by [gainsurgery](https://pypi.org/project/gainsurgery/): each adapted weight was
replaced by `W · diag(s)` ({PAPER}). Shapes, dtypes and the shard layout are those of
the base; inference costs exactly what the base costs.
{'' if base_model else _base_text({**base, 'given': base_shown})}
| gain file | method | parameters | sha256 |
|---|---|---|---|
{rows}

- tensors rescaled: {md_text(provenance.get('tensors_scaled'), 20)}
- total gain parameters: {md_text(provenance.get('gain_parameters'), 20)}
- provenance (base, gain files, per-shard sha256): `{md_text(provenance_file, 60)}`

Check it: `gainsurgery verify BASE GAIN... THIS_FOLDER` recomputes every rescaled tensor
and compares every other byte with the base.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")
```
"""
    )


_METHODS = {
    "gain": "attention output projections",
    "gain-ffn": "attention output and FFN down projections",
}


def gain_base_model(meta: Mapping[str, Any]) -> str | None:
    """The Hub base a gain file's metadata may be trusted to name, or None.

    Its ``base_model`` when that is exactly a repo id *and* the file records a
    ``base_tensors_sha256`` (gainsurgery writes ``base_model`` only for a Hub base
    in such files); older files may hold a local path that reads like a repo id.

    Example:
        >>> gain_base_model({"base_model": "checkpoints/final"}) is None
        True
    """
    value = meta.get("base_model")
    return hub_id_or_none(value) if meta.get(BASE_TENSORS_KEY) else None


def gain_model_card(gain, file_name: str, repo_id: str, base: Mapping[str, Any] | None = None,
                    base_model: str | None = None) -> str:
    """Model card (README.md) for a gain file published on its own.

    Args:
        gain: the :class:`~gainsurgery.gainfile.GainFile` being published.
        file_name: its path in the repo (e.g. ``gain.safetensors``).
        repo_id: the repo it is pushed to, for the apply example.
        base: what is known about a non-Hub base (license, upstream model), if anything.
        base_model: an explicit Hub id for ``base_model`` (``push --base-model``);
            default: :func:`gain_base_model`.
    """
    meta = gain.metadata
    method = _tag(meta.get("method"), "gain")
    side = "out" if meta.get("side") == "out" else "in"
    base_model = hub_id_or_none(base_model) or gain_base_model(meta)
    fields = {
        "base_model": base_model,
        "base_model_relation": "adapter",
        "license": (base or {}).get("license") if not base_model else None,
        "library_name": "gainsurgery",
        "tags": ["gainsurgery", "gain", method],
    }
    st = stats(gain)
    o = st["overall"]
    rows = "\n".join(
        f"| {md_text(layer, 40)} | {s['count']} | {s['min']:.4f} | {s['max']:.4f} | {s['mean']:.4f} |"
        for layer, s in st["per_layer"].items()
    )
    scaled = "W · diag(s) (input side: the features entering each weight)" if side == "in" else \
        "diag(s) · W (output side; the bias is scaled too)"
    recorded = meta.get("base_model")
    base_text = _link(base_model) if base_model else (
        md_text(recorded, 120) if recorded else "the base it was trained on")
    base_arg = base_model or "BASE"
    description = f"\n{md_text(meta['description'], 1000)}\n" if meta.get("description") else ""
    fingerprint = meta.get("base_tensors_sha256") or meta.get("base_fingerprint") or "n/a"
    return (
        _front_matter(fields)
        + f"""
# GAIN gains for {base_model or 'a base model'} ({method})
{description}
This repo holds a **GAIN** gain file, {md_text(file_name, 120)}: one multiplicative gain per channel of
the adapted weights of {base_text}, learned for domain adaptation ({PAPER}). Applying it
replaces each adapted weight W by {scaled}. Unlike LoRA it adds no new directions, so
earlier domains are kept; once merged, inference costs exactly what the base costs.
{'' if base_model else _base_text({**(base or {}), 'given': recorded})}
- method: {md_text(method, 40)} ({_METHODS.get(method, 'see the file metadata')})
- side: `{side}`
- parameters: {st['parameters']:,} ({format_count(st['parameters'])}) in {st['tensors']} tensors
- gains: min {o['min']:.4f}, max {o['max']:.4f}, mean {o['mean']:.4f}
- base fingerprint: {md_text(fingerprint, 80)}

## Apply it

```
pip install gainsurgery
gainsurgery apply {base_arg} {repo_id}:{_plain_path(file_name)} merged/
```

This streams the base's shards (from the Hub or a local folder) into `merged/` with the
gains absorbed, in constant memory; `gainsurgery verify` checks the result bit for bit
(and `apply` checks the file's base fingerprint against the base's weights).

## Per layer

| layer | gains | min | max | mean |
|---|---|---|---|---|
{rows}
"""
    )


def _plain_path(name: str) -> str:
    """A file name safe inside a fenced code block (no backticks, one line)."""
    return " ".join(str(name).replace("`", "'").split())[:200]


def gguf_model_card(record: Mapping[str, Any], file_name: str, *, base_model: str | None = None) -> str:
    """Model card for a GGUF file adapted by ``gainsurgery apply`` (from its ``gainsurgery.record``).

    Args:
        record: the record the file carries (base, gains, per-tensor routes and errors).
        file_name: the file's name in the repo.
        base_model: the Hub id of the base (``--base-model``, or a Hub base's repo);
            when None, the record's ``base.hub`` is used if it is one; nothing else is claimed.
    """
    base = record.get("base", {}) or {}
    base = base if isinstance(base, Mapping) else {}
    gains = [g for g in (record.get("gains") or []) if isinstance(g, Mapping)]
    tensors = [t for t in (record.get("tensors") or []) if isinstance(t, Mapping)]
    routes = [r for r in (record.get("routes") or []) if isinstance(r, Mapping)]
    base_model = hub_id_or_none(base_model) or hub_id_or_none(base.get("hub"))
    base_shown = base.get("embedded") or base.get("hub") or base.get("name") or "the base model"
    method = _tag(next((g.get("method") for g in gains if g.get("method")), None), "gain")
    fields = {
        "base_model": base_model,
        "base_model_relation": "merge" if base_model else None,
        "license": base.get("license"),
        "tags": ["gguf", "gainsurgery", "gain", method, "merge"],
    }
    moved = sum(1 for r in routes if r.get("route") == "moved")
    promoted = sorted({f"{t.get('type')} -> {t.get('type_out')}" for t in tensors
                       if t.get("type") != t.get("type_out")})
    rows = "\n".join(
        f"| {md_text(g.get('name'), 120)} | {md_text(g.get('method') or '?', 40)} | "
        f"{md_text(g.get('parameters'), 20)} | {md_text(str(g.get('sha256'))[:16], 16)} |"
        for g in gains)
    file_shown = md_text(file_name, 120)
    title = base_model or md_text(base_shown, 120)
    return (
        _front_matter(fields)
        + f"""
# {title} + GAIN ({method}), GGUF

`{file_shown}` is {md_text(base_shown, 200)} (GGUF, sha256 `{md_text(str(base.get('sha256'))[:16], 16)}`)
with {len(gains)} GAIN gain file(s) applied straight to its quantized tensors by
[gainsurgery](https://pypi.org/project/gainsurgery/): each adapted weight became `W · diag(s)`
({PAPER}). Every key/value of the base is kept; the provenance is in the file's
`gainsurgery.*` metadata.
{'' if base_model else _base_text({**base, 'given': base_shown})}
| gain file | method | parameters | sha256 |
|---|---|---|---|
{rows}

- gain keys: {len(routes)}, of which {moved} moved exactly onto another tensor's rows (block scales only)
- tensors rewritten: {len(tensors)}; tensor types changed: {md_text(', '.join(promoted) or 'none', 200)}

Check it: `gainsurgery verify BASE.gguf GAIN... {file_shown}` recomputes every rewritten
tensor and compares every other byte and key/value with the base.

## Use

```bash
llama-cli -m {file_shown} -p "The court held that"
```
"""
    )
