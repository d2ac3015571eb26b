"""Model cards (README.md with YAML front matter) for merged models and gain files.

Cards claim ``base_model`` only for a Hub base (a repo id); a local folder or an
embedded model is named in the text instead, with the license and the upstream
model when the base's record knows them (``base`` facts, see
:func:`gainsurgery.sources.base_facts`).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from gainsurgery.hub.refs import is_repo_id

#: Where the Hub reads a repo's model card.
CARD_NAME = "README.md"

PAPER = "arXiv 2604.04516 (GAIN: multiplicative modulation for domain adaptation)"
HUB_URL = "https://huggingface.co"


def hub_id_or_none(value: str | None) -> str | None:
    """``value`` (without an ``@revision``) when it looks like a Hub repo id (``org/name``), else None."""
    if not value or not isinstance(value, str):
        return None
    value = value.split("@", 1)[0]
    return value if is_repo_id(value) else None


def _base_text(facts: Mapping[str, Any] | None) -> str:
    """A paragraph naming a non-Hub base's upstream model and license, or "" when unknown."""
    if not facts:
        return ""
    parts = []
    origin, upstream = facts.get("upstream_origin"), facts.get("upstream")
    if origin or upstream:
        named = origin or upstream
        text = f"is [{named}]({HUB_URL}/{named})"
        if upstream and upstream != named:
            text += f", taken from [{upstream}]({HUB_URL}/{upstream})"
        if facts.get("description"):
            text += f" ({facts['description']})"
        parts.append(text)
    if facts.get("license"):
        name = facts.get("license_name") or facts["license"]
        link = facts.get("license_link")
        parts.append(f"is distributed under the {f'[{name}]({link})' if link else name} "
                     f"(license `{facts['license']}`), which applies to this model too")
    given = facts.get("given") or "The base model"
    return f"\nThe base model, `{given}`, " + "; it ".join(parts) + ".\n" if parts else ""


def _front_matter(fields: dict[str, Any]) -> str:
    lines = ["---"]
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(v)}" for v in value)
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    lines.append("---")
    return "\n".join(lines) + "\n"


def merged_model_card(provenance: Mapping[str, Any], *, provenance_file: str, base_model: str | None = None) -> str:
    """Model card for a folder produced by ``gainsurgery apply``.

    Args:
        provenance: the folder's provenance record (base, gain files, shards).
        provenance_file: the name of the file that holds it, cited in the card.
        base_model: the Hub id of the base; when unknown, it is taken from the
            base as given or the gain files' ``base_model`` if either is a Hub id.
            A non-Hub base gets no ``base_model``; its license and upstream model
            (recorded in ``provenance["base"]``) are named instead.
    """
    base = provenance.get("base", {}) or {}
    base_given = base.get("given")
    gains = provenance.get("gains", [])
    base_model = base_model or hub_id_or_none(base_given) or next(
        (hub_id_or_none(g.get("base_model")) for g in gains if hub_id_or_none(g.get("base_model"))), None
    )
    method = provenance.get("method") or "gain"
    fields = {
        "base_model": base_model,
        "base_model_relation": "merge" if base_model else None,
        "license": base.get("license"),
        "library_name": "transformers",
        "tags": ["gainsurgery", "gain", method, "merge"],
    }
    rows = "\n".join(
        f"| `{g.get('name')}` | {g.get('method') or '?'} | {g.get('parameters')} | `{str(g.get('sha256'))[:16]}` |"
        for g in gains
    )
    return (
        _front_matter(fields)
        + f"""
# {base_model or base_given} + GAIN ({method})

This checkpoint is `{base_given}` with {len(gains)} GAIN gain file(s) absorbed into its
weights by [gainsurgery](https://pypi.org/project/gainsurgery/): each adapted weight was
replaced by `W · diag(s)` ({PAPER}). Shapes, dtypes and the shard layout are those of
the base; inference costs exactly what the base costs.
{'' if base_model else _base_text({**base, 'given': base_given})}
| gain file | method | parameters | sha256 |
|---|---|---|---|
{rows}

- tensors rescaled: {provenance.get('tensors_scaled')}
- total gain parameters: {provenance.get('gain_parameters')}
- provenance (base, gain files, per-shard sha256): `{provenance_file}`

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


def gain_model_card(gain, file_name: str, repo_id: str, base: Mapping[str, Any] | None = None) -> str:
    """Model card (README.md) for a gain file published on its own.

    Args:
        gain: the :class:`~gainsurgery.gainfile.GainFile` being published.
        file_name: its path in the repo (e.g. ``gain.safetensors``).
        repo_id: the repo it is pushed to, for the apply example.
        base: what is known about a non-Hub base (license, upstream model), if anything.
    """
    from gainsurgery.gainfile import format_count, stats

    meta = gain.metadata
    method = str(meta.get("method") or "gain")
    side = str(meta.get("side") or "in")
    base_model = hub_id_or_none(meta.get("base_model") if isinstance(meta.get("base_model"), str) else None)
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
        f"| {layer} | {s['count']} | {s['min']:.4f} | {s['max']:.4f} | {s['mean']:.4f} |"
        for layer, s in st["per_layer"].items()
    )
    scaled = "W · diag(s) (input side: the features entering each weight)" if side == "in" else \
        "diag(s) · W (output side; the bias is scaled too)"
    base_text = f"`{base_model}`" if base_model else f"`{meta.get('base_model') or 'the base it was trained on'}`"
    base_arg = base_model or "BASE"
    description = f"\n{meta['description']}\n" if meta.get("description") else ""
    return (
        _front_matter(fields)
        + f"""
# GAIN gains for {base_model or 'a base model'} ({method})
{description}
This repo holds a **GAIN** gain file, `{file_name}`: one multiplicative gain per channel of
the adapted weights of {base_text}, learned for domain adaptation ({PAPER}). Applying it
replaces each adapted weight W by {scaled}. Unlike LoRA it adds no new directions, so
earlier domains are kept; once merged, inference costs exactly what the base costs.
{'' if base_model else _base_text({**(base or {}), 'given': meta.get('base_model')})}
- method: `{method}` ({_METHODS.get(method, 'see the file metadata')})
- side: `{side}`
- parameters: {st['parameters']:,} ({format_count(st['parameters'])}) in {st['tensors']} tensors
- gains: min {o['min']:.4f}, max {o['max']:.4f}, mean {o['mean']:.4f}
- base fingerprint: `{meta.get('base_fingerprint', 'n/a')}`

## Apply it

```
pip install gainsurgery
gainsurgery apply {base_arg} {repo_id}:{file_name} merged/
```

This streams the base's shards (from the Hub or a local folder) into `merged/` with the
gains absorbed, in constant memory; `gainsurgery verify` checks the result bit for bit.

## Per layer

| layer | gains | min | max | mean |
|---|---|---|---|---|
{rows}
"""
    )
