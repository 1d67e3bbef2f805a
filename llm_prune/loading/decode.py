"""Stored tensors -> dense tensors: a checkpoint seen as the dense model it holds, whatever its format.

Plain safetensors tensors are read as they are; the sparse formats of ``llm_prune.kernels.formats``
(bitmask, packed24) register a ``Decoder``, and so can other formats.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Collection, Iterator

import torch

from ..arch import Arch
from ..kernels import formats
from ..reader import CheckpointReader, TensorInfo, Unit, check_layers, group_units


@dataclass(frozen=True)
class Decoder:
    """How a stored format becomes dense tensors; register one with ``register_decoder``.

    ``plan(reader)`` claims stored tensors: ``{dense name: (TensorInfo of the dense tensor,
    [stored names])}``; ``decode(dense name, {stored name: tensor}, metadata)`` returns the
    dense tensor (a fresh tensor, never a view into the read-only mmap that is then written to);
    ``metadata`` is the safetensors ``__metadata__`` of the file holding the first stored part.
    Stored tensors no decoder claims are read as they are.
    """

    name: str
    plan: Callable[[CheckpointReader], dict[str, tuple[TensorInfo, list[str]]]]
    decode: Callable[[str, dict[str, torch.Tensor], dict[str, str]], torch.Tensor]


DECODERS: dict[str, Decoder] = {}


def register_decoder(decoder: Decoder) -> Decoder:
    DECODERS[decoder.name] = decoder
    return decoder


def _formats_plan(reader: CheckpointReader) -> dict[str, tuple[TensorInfo, list[str]]]:
    """Claim the tensors that llm-prune's exporter stored as bitmask or packed24: each shard's
    ``__metadata__`` names them, with their dense shape and dtype."""
    plan = {}
    for file, meta in reader.metadata.items():
        for name in formats.encoded_names(meta):
            info = formats.tensor_info(name, meta)
            dense = TensorInfo(name, file, formats.DTYPES[info["dtype"]], tuple(info["shape"]))
            plan[name] = (dense, formats.stored_names(name, info["format"]))
    return plan


class DenseSource:
    """A checkpoint seen as dense tensors: the reader's tensors, with registered decoders applied."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self.infos: dict[str, TensorInfo] = {}
        self.recipe: dict[str, tuple[Decoder | None, list[str]]] = {}
        claimed: set[str] = set()
        for decoder in DECODERS.values():
            for dense, (info, stored) in decoder.plan(reader).items():
                self.infos[dense], self.recipe[dense] = info, (decoder, stored)
                claimed.update(stored)
        for name, info in reader.infos.items():
            if name not in claimed:
                self.infos[name], self.recipe[name] = info, (None, [name])

    @property
    def decoded(self) -> bool:
        return any(d is not None for d, _ in self.recipe.values())

    def units(self, arch: Arch) -> list[Unit]:
        units = group_units(self.infos, arch)
        check_layers(self.reader.config, units, self.reader.path)
        return units

    def file_of(self, name: str) -> str:
        """The file holding (the first stored part of) a dense tensor."""
        return self.reader.infos[self.recipe[name][1][0]].file

    def read(self, names: list[str], mapped: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        """Dense tensors one at a time, in file order (each shard opened once). Stored tensors
        named in ``mapped`` come as private mappings of the file (read when touched, as
        transformers loads them); the others are read into fresh memory."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.file_of(n), []).append(n)
        for dense_names in by_file.values():
            plain = [n for n in dense_names if self.recipe[n][0] is None]
            if not self.reader.pickle:
                lazy = [n for n in plain if n in mapped]
                yield from heapq.merge(self.reader.read_fresh([n for n in plain if n not in mapped]),
                                       self.reader.read_mapped(lazy), key=lambda item: self.reader.infos[item[0]].offset)
            else:
                for n in plain:
                    yield n, self.reader.read([n])[n]
            for n in dense_names:  # decoded: stored parts may live in other shards, the reader finds them
                decoder, stored = self.recipe[n]
                if decoder is not None:
                    meta = self.reader.metadata.get(self.reader.infos[stored[0]].file, {})
                    yield n, decoder.decode(n, self.reader.read(stored), meta)


register_decoder(Decoder("llm-prune formats", _formats_plan, formats.decode))
