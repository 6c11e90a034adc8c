"""--variants of a sweep command (jaxreco.ablations, jaxmuvla.pretrain_sweep): names or set names."""

from __future__ import annotations

from typing import Mapping, Sequence

from vlcore.errors import InputError


def select_variants(names: Sequence[str], variants: Sequence[str], sets: Mapping[str, Sequence[str]]) -> list[str]:
    """Names or set names ('main', 'all') -> variants in their canonical order; unknown names raise InputError."""
    wanted = {v for name in names for v in sets.get(name, (name,))}
    unknown = sorted(wanted - set(variants))
    if unknown:
        raise InputError(f"--variants: unknown {unknown}; known: {', '.join(sets)}, {', '.join(variants)}")
    return [v for v in variants if v in wanted]
