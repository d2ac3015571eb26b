"""Model cards (README.md with YAML front matter) for merged models and gain files."""

from __future__ import annotations

import json
import re
from typing import Any

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

PAPER = "arXiv 2604.04516 (GAIN: multiplicative modulation for domain adaptation)"


def hub_id_or_none(value: str | None) -> str | None:
    """``value`` when it looks like a Hub repo id (``org/name``), else None."""
    if not value:
        return None
    value = value.split("@", 1)[0]
    return value if _HUB_ID.match(value) and not value.startswith((".", "/")) else None


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


def merged_model_card(provenance: dict[str, Any], base_model: str | None = None) -> str:
    """Model card for a folder produced by ``gainsurgery apply``.

    ``base_model`` is the Hub id of the base; when unknown, it is taken from the
    base as given or the gain file's ``base_model`` metadata if either is a Hub id.
    """
    base_given = provenance.get("base", {}).get("given")
    gains = provenance.get("gains", [])
    base_model = base_model or hub_id_or_none(base_given) or next(
        (hub_id_or_none(g.get("base_model")) for g in gains if hub_id_or_none(g.get("base_model"))), None
    )
    method = provenance.get("method") or "gain"
    fields = {
        "base_model": base_model,
        "base_model_relation": "merge" if base_model else None,
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

| gain file | method | parameters | sha256 |
|---|---|---|---|
{rows}

- tensors rescaled: {provenance.get('tensors_scaled')}
- total gain parameters: {provenance.get('gain_parameters')}
- provenance (base, gain files, per-shard sha256): `gainsurgery.json`

Check it: `gainsurgery verify BASE GAIN... THIS_FOLDER` recomputes every rescaled tensor
and compares every other byte with the base.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")
```
"""
    )
