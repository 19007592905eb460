"""The two-tower retrieval model: model, training task and serving module as three classes.

* :class:`TwoTowerModel` holds the two towers. The user tower reads a hashed user id, the mean of
  the user's recent positive items and the profile (age group, region, language); the item tower
  reads the item id and its content (type, category, mean of tags, creator). Each tower ends in an
  MLP whose output is L2-normalised, so a dot product is a cosine.
* :class:`SampledSoftmaxTask` is the loss: a softmax over the batch, where each row's positive item
  is the target and the other rows' items are its negatives, with the logQ correction.
* :class:`TwoTowerServing` is the request-time side: embed the whole catalog (items unseen in
  training from their content alone) and one user from the ids a request carries.

Id-dropout is what makes new items work: during training, a share of rows lose their id embedding
(zeroed), so the item tower learns to place an item from its content alone. At serving time an item
without its own id (vocabulary index 0) is exactly such a row.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import TwoTowerConfig
from training.encoding import UNKNOWN, ItemFeatures, Vocabularies, stable_bucket

USER_INPUTS: Final = ("user_bucket", "history", "age_group", "region", "language")
"""Batch columns the user tower reads."""

ITEM_INPUTS: Final = ("item_index", "item_type", "category", "tags", "creator")
"""Batch columns the item tower reads."""

WEIGHTS_FILE: Final = "two_tower.pt"
MODEL_FILE: Final = "two_tower.json"
RECENT_USERS: Final = 256
"""Single-user embeddings a serving model remembers (see :meth:`TwoTowerServing.user_embeddings`)."""

_UserKey = tuple[str | None, tuple[str, ...], str | None, str | None, str | None]


@dataclass(frozen=True)
class TwoTowerSizes:
    """Rows of each embedding table (vocabulary sizes, unknown row included).

    Attributes:
        user_buckets: Hash buckets of user ids.
        item: Item id vocabulary.
        item_type: Item types.
        category: Categories.
        tag: Tags.
        creator: Creators.
        age_group: Age groups.
        region: Regions.
        language: Languages.
    """

    user_buckets: int
    item: int
    item_type: int
    category: int
    tag: int
    creator: int
    age_group: int
    region: int
    language: int

    @classmethod
    def from_vocabularies(cls, vocabularies: Vocabularies) -> TwoTowerSizes:
        """The sizes a set of vocabularies needs."""
        sizes = vocabularies.sizes()
        return cls(**{name: sizes[name] for name in cls.__dataclass_fields__})

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            assert value >= 1, f"embedding table {name!r} needs at least one row, got {value}"


def _mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_dim
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def _masked_mean(embeddings: Tensor, indices: Tensor) -> Tensor:
    """Mean over the non-padding positions of ``(batch, length, dim)`` embeddings (0 when none)."""
    present = (indices != UNKNOWN).unsqueeze(-1).to(embeddings.dtype)
    return (embeddings * present).sum(dim=1) / present.sum(dim=1).clamp(min=1.0)


def _id_keep(batch_size: int, dropout: float, training: bool, device: torch.device) -> Tensor | None:
    if not training or dropout <= 0:
        return None
    return (torch.rand(batch_size, 1, device=device) >= dropout).float()


class UserTower(nn.Module):
    """Hashed user id + mean-pooled history items + profile -> normalised embedding."""

    def __init__(self, config: TwoTowerConfig, sizes: TwoTowerSizes) -> None:
        """Build the tower's tables and MLP.

        Args:
            config: Dimensions and dropout.
            sizes: Embedding table rows.
        """
        super().__init__()
        self.config = config
        self.bucket = nn.Embedding(sizes.user_buckets, config.id_dim)
        self.history = nn.Embedding(sizes.item, config.id_dim, padding_idx=UNKNOWN)
        self.age_group = nn.Embedding(sizes.age_group, config.content_dim, padding_idx=UNKNOWN)
        self.region = nn.Embedding(sizes.region, config.content_dim, padding_idx=UNKNOWN)
        self.language = nn.Embedding(sizes.language, config.content_dim, padding_idx=UNKNOWN)
        self.mlp = _mlp(2 * config.id_dim + 3 * config.content_dim, config.hidden_dims, config.embedding_dim)

    def forward(
        self,
        user_bucket: Tensor,
        history: Tensor,
        age_group: Tensor,
        region: Tensor,
        language: Tensor,
        id_keep: Tensor | None = None,
    ) -> Tensor:
        """Embed a batch of users.

        Args:
            user_bucket: ``(batch,)`` hash buckets.
            history: ``(batch, history_length)`` item indices, 0-padded.
            age_group: ``(batch,)`` indices.
            region: ``(batch,)`` indices.
            language: ``(batch,)`` indices.
            id_keep: ``(batch, 1)`` multiplier of the bucket embedding (0 drops it); during training
                drawn from ``user_id_dropout`` when omitted.

        Returns:
            ``(batch, embedding_dim)`` unit vectors.
        """
        ids = self.bucket(user_bucket)
        keep = (
            id_keep
            if id_keep is not None
            else _id_keep(len(user_bucket), self.config.user_id_dropout, self.training, ids.device)
        )
        if keep is not None:
            ids = ids * keep
        features = torch.cat(
            [
                ids,
                _masked_mean(self.history(history), history),
                self.age_group(age_group),
                self.region(region),
                self.language(language),
            ],
            dim=-1,
        )
        return F.normalize(self.mlp(features), dim=-1)


class ItemTower(nn.Module):
    """Item id + content (type, category, mean of tags, creator) -> normalised embedding."""

    def __init__(self, config: TwoTowerConfig, sizes: TwoTowerSizes) -> None:
        """Build the tower's tables and MLP.

        Args:
            config: Dimensions and dropout.
            sizes: Embedding table rows.
        """
        super().__init__()
        self.config = config
        self.item = nn.Embedding(sizes.item, config.id_dim, padding_idx=UNKNOWN)
        self.item_type = nn.Embedding(sizes.item_type, config.content_dim, padding_idx=UNKNOWN)
        self.category = nn.Embedding(sizes.category, config.content_dim, padding_idx=UNKNOWN)
        self.tag = nn.Embedding(sizes.tag, config.content_dim, padding_idx=UNKNOWN)
        self.creator = nn.Embedding(sizes.creator, config.content_dim, padding_idx=UNKNOWN)
        self.mlp = _mlp(config.id_dim + 4 * config.content_dim, config.hidden_dims, config.embedding_dim)

    def forward(
        self,
        item_index: Tensor,
        item_type: Tensor,
        category: Tensor,
        tags: Tensor,
        creator: Tensor,
        id_keep: Tensor | None = None,
    ) -> Tensor:
        """Embed a batch of items.

        Args:
            item_index: ``(batch,)`` item vocabulary indices (0: no id embedding, content only).
            item_type: ``(batch,)`` indices.
            category: ``(batch,)`` indices.
            tags: ``(batch, max_tags)`` indices, 0-padded.
            creator: ``(batch,)`` indices.
            id_keep: ``(batch, 1)`` multiplier of the id embedding (0 drops it); during training
                drawn from ``item_id_dropout`` when omitted.

        Returns:
            ``(batch, embedding_dim)`` unit vectors.
        """
        ids = self.item(item_index)
        keep = (
            id_keep
            if id_keep is not None
            else _id_keep(len(item_index), self.config.item_id_dropout, self.training, ids.device)
        )
        if keep is not None:
            ids = ids * keep
        features = torch.cat(
            [
                ids,
                self.item_type(item_type),
                self.category(category),
                _masked_mean(self.tag(tags), tags),
                self.creator(creator),
            ],
            dim=-1,
        )
        return F.normalize(self.mlp(features), dim=-1)


class TwoTowerModel(nn.Module):
    """The user and item towers; ``forward`` embeds both sides of a batch of positives."""

    def __init__(self, config: TwoTowerConfig, sizes: TwoTowerSizes) -> None:
        """Build both towers.

        Args:
            config: Dimensions and dropout.
            sizes: Embedding table rows.
        """
        super().__init__()
        self.config = config
        self.sizes = sizes
        self.user_tower = UserTower(config, sizes)
        self.item_tower = ItemTower(config, sizes)

    def forward(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Embed the users and the positive items of a batch.

        Args:
            batch: Tensors named as :data:`USER_INPUTS` and :data:`ITEM_INPUTS`.

        Returns:
            ``(user_embeddings, item_embeddings)``, each ``(batch, embedding_dim)``.
        """
        users = self.user_tower(*(batch[name] for name in USER_INPUTS))
        items = self.item_tower(*(batch[name] for name in ITEM_INPUTS))
        return users, items


class SampledSoftmaxTask(nn.Module):
    """In-batch sampled softmax with logQ correction.

    For a batch of B (user, positive item) rows the logits are ``u_i . v_j / temperature`` for every
    pair; row i's label is column i. Every other column is a negative drawn from the positive
    distribution, which over-represents popular items; subtracting ``log q_j`` (the item's
    probability of being in a batch) from column j corrects that bias (Yi et al., RecSys 2019).
    Columns holding the same item as the row's positive ("accidental hits") are masked out.
    """

    def __init__(self, temperature: float, *, logq_correction: bool = True) -> None:
        """Configure the loss.

        Args:
            temperature: Divides the cosine logits; lower is sharper.
            logq_correction: Subtract ``log q`` from each column's logits.
        """
        super().__init__()
        assert temperature > 0, f"temperature must be positive, got {temperature}"
        self.temperature = temperature
        self.logq_correction = logq_correction

    def logits(self, users: Tensor, items: Tensor, log_q: Tensor, item_ids: Tensor | None = None) -> Tensor:
        """The ``(B, B)`` logits the loss is computed from.

        Args:
            users: ``(B, dim)`` user embeddings.
            items: ``(B, dim)`` embeddings of each row's positive item.
            log_q: ``(B,)`` log sampling probability of each row's item.
            item_ids: ``(B,)`` item indices; columns with the row's own item (other than the
                diagonal) are masked. Index 0 (unknown) never matches.

        Returns:
            The logits.
        """
        assert users.shape == items.shape, f"user {tuple(users.shape)} and item {tuple(items.shape)} differ"
        assert log_q.shape == (items.shape[0],), f"log_q must be (B,), got {tuple(log_q.shape)}"
        logits = users @ items.T / self.temperature
        if self.logq_correction:
            logits = logits - log_q.unsqueeze(0)
        if item_ids is not None:
            same = (item_ids.unsqueeze(0) == item_ids.unsqueeze(1)) & (item_ids.unsqueeze(0) != UNKNOWN)
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, torch.finfo(logits.dtype).min)
        return logits

    def forward(self, users: Tensor, items: Tensor, log_q: Tensor, item_ids: Tensor | None = None) -> Tensor:
        """Mean cross-entropy of each row's positive against the batch (see :meth:`logits`)."""
        logits = self.logits(users, items, log_q, item_ids)
        labels = torch.arange(len(users), device=logits.device)
        return F.cross_entropy(logits, labels)


def to_tensors(arrays: Mapping[str, npt.NDArray[np.generic]]) -> dict[str, Tensor]:
    """Numpy columns to tensors (integers as int64, floats as float32)."""
    tensors = {}
    for name, values in arrays.items():
        if np.issubdtype(values.dtype, np.integer):
            converted = np.asarray(values, dtype=np.int64)
        elif np.issubdtype(values.dtype, np.floating):
            converted = np.asarray(values, dtype=np.float32)
        else:
            continue
        # Arrays read from Ray's object store are read-only; torch wants memory it may write.
        tensors[name] = torch.from_numpy(converted if converted.flags.writeable else converted.copy())
    return tensors


class TwoTowerServing:
    """Request-time embeddings from a trained :class:`TwoTowerModel`.

    Attributes:
        model: The model, in eval mode.
        vocabularies: The vocabularies it was trained with.
    """

    def __init__(self, model: TwoTowerModel, vocabularies: Vocabularies) -> None:
        """Wrap a trained model.

        Args:
            model: The trained model (unwrapped from DDP).
            vocabularies: The vocabularies it was trained with.
        """
        sizes = TwoTowerSizes.from_vocabularies(vocabularies)
        assert model.sizes == sizes, f"model tables {model.sizes} do not match the vocabularies {sizes}"
        self.model = model.eval()
        self.vocabularies = vocabularies
        # The request's retrieval and its ranker embed the same user from the same inputs; where
        # both run in one process (models in the ingress) the second finds the first's vector.
        # The retrieval side embeds from a worker thread, hence the lock.
        self._recent_users: OrderedDict[_UserKey, npt.NDArray[np.float32]] = OrderedDict()
        self._recent_lock = threading.Lock()

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self.model.config.embedding_dim

    @torch.no_grad()
    def item_embeddings(self, items: ItemFeatures, *, batch_size: int = 8192) -> npt.NDArray[np.float32]:
        """Embed items; those without an id embedding (index 0) are placed from content alone.

        Args:
            items: Encoded items (the whole catalog, or new items).
            batch_size: Items per forward pass.

        Returns:
            ``(len(items), dim)`` unit vectors, float32.
        """
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        arrays = items.arrays()
        for start in range(0, len(items), batch_size):
            chunk = to_tensors({k: v[start : start + batch_size] for k, v in arrays.items()})
            out[start : start + batch_size] = self.model.item_tower(*(chunk[n] for n in ITEM_INPUTS)).numpy()
        return out

    def encode_history(self, history_items: Sequence[Sequence[str]]) -> npt.NDArray[np.int64]:
        """Item ids, most recent first, as the ``(users, history_length)`` index matrix the tower reads.

        Items without an id embedding are skipped rather than kept as padding, so a history of new
        items still fills the window with known ones.
        """
        width = self.vocabularies.history_length
        matrix = np.zeros((len(history_items), width), dtype=np.int64)
        for row, items in enumerate(history_items):
            known = [i for i in self.vocabularies.item.lookup(list(items)).tolist() if i != UNKNOWN][:width]
            matrix[row, : len(known)] = known
        return matrix

    @torch.no_grad()
    def user_embeddings(
        self,
        user_ids: Sequence[str | None],
        history_items: Sequence[Sequence[str]],
        profiles: Sequence[Mapping[str, str | None]] | None = None,
    ) -> npt.NDArray[np.float32]:
        """Embed users from what a request carries.

        Args:
            user_ids: User ids (hashed; ``None`` for an anonymous request drops the id embedding).
            history_items: Each user's recent positive item ids, most recent first.
            profiles: Each user's ``age_group``, ``region`` and ``language`` (missing keys: unknown).

        Returns:
            ``(len(user_ids), dim)`` unit vectors, float32.
        """
        n_users = len(user_ids)
        assert len(history_items) == n_users, f"{len(history_items)} histories for {n_users} users"
        profiles = profiles if profiles is not None else [{} for _ in range(n_users)]
        assert len(profiles) == n_users, f"{len(profiles)} profiles for {n_users} users"
        if n_users != 1:
            return self._embed_users(user_ids, history_items, profiles)
        # Only single users are remembered: a row embedded within a larger batch may differ from
        # the same row alone in its last bits, and a remembered vector must be what a call returns.
        profile = profiles[0]
        key = (
            user_ids[0],
            tuple(history_items[0]),
            profile.get("age_group"),
            profile.get("region"),
            profile.get("language"),
        )
        with self._recent_lock:
            found = self._recent_users.get(key)
        if found is not None:
            return found
        embedded = self._embed_users(user_ids, history_items, profiles)
        embedded.setflags(write=False)
        with self._recent_lock:
            self._recent_users[key] = embedded
            while len(self._recent_users) > RECENT_USERS:
                self._recent_users.popitem(last=False)
        return embedded

    def _embed_users(
        self,
        user_ids: Sequence[str | None],
        history_items: Sequence[Sequence[str]],
        profiles: Sequence[Mapping[str, str | None]],
    ) -> npt.NDArray[np.float32]:
        buckets = stable_bucket([u or "" for u in user_ids], self.vocabularies.user_buckets)
        keep = torch.tensor([[0.0 if u is None else 1.0] for u in user_ids])
        fields = {
            name: getattr(self.vocabularies, name).lookup([p.get(name) for p in profiles])
            for name in ("age_group", "region", "language")
        }
        return self.user_embeddings_encoded(
            {"user_bucket": buckets, "history": self.encode_history(history_items), **fields}, id_keep=keep
        )

    @torch.no_grad()
    def user_embeddings_encoded(
        self, arrays: Mapping[str, npt.NDArray[np.int64]], *, id_keep: Tensor | None = None
    ) -> npt.NDArray[np.float32]:
        """Embed users already encoded as the tower's input columns (:data:`USER_INPUTS`)."""
        tensors = to_tensors(arrays)
        embeddings = self.model.user_tower(*(tensors[n] for n in USER_INPUTS), id_keep=id_keep)
        return np.asarray(embeddings.numpy(), dtype=np.float32)

    def user_embedding(
        self,
        history_items: Sequence[str],
        profile: Mapping[str, str | None] | None = None,
        user_id: str | None = None,
    ) -> npt.NDArray[np.float32]:
        """Embed one user at request time.

        Args:
            history_items: Recent positive item ids, most recent first.
            profile: ``age_group``, ``region``, ``language``.
            user_id: The user id, or ``None`` for an anonymous request.

        Returns:
            A ``(dim,)`` unit vector.
        """
        embeddings = self.user_embeddings([user_id], [history_items], [profile or {}])
        return np.asarray(embeddings[0], dtype=np.float32)

    def save(self, directory: str | Path) -> None:
        """Write the weights and the model shape (``two_tower.pt``, ``two_tower.json``)."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), root / WEIGHTS_FILE)
        shape = {"config": self.model.config.model_dump(mode="json"), "sizes": asdict(self.model.sizes)}
        (root / MODEL_FILE).write_text(json.dumps(shape, indent=2))

    @classmethod
    def load(cls, directory: str | Path, vocabularies: Vocabularies) -> TwoTowerServing:
        """Read what :meth:`save` wrote.

        Args:
            directory: The directory given to :meth:`save` (or a bundle root).
            vocabularies: The vocabularies saved with the model.

        Returns:
            The serving module.
        """
        root = Path(directory)
        shape = json.loads((root / MODEL_FILE).read_text())
        model = TwoTowerModel(TwoTowerConfig.model_validate(shape["config"]), TwoTowerSizes(**shape["sizes"]))
        model.load_state_dict(torch.load(root / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        return cls(model, vocabularies)
