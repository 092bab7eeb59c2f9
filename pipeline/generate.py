"""Schema-faithful WeChat Channels 2021 generator with a planted model and a separate oracle.

``python -m pipeline generate --out DIR --scale tiny|small|full --seed N`` writes, in the
real preliminary-round formats (see ``shared/docs/wechat_2021.md``):

- ``user_action.csv`` (13 columns, days 1..14, rows of a user contiguous and in day order,
  duplicate (userid, feedid) pairs present),
- ``feed_info.csv`` (15 columns; empty text / bgm / keyword fields where the real data has
  them; ``machine_tag_list`` as ``"tagid prob;tagid prob"``),
- ``feed_embeddings.csv`` (``feedid,feed_embedding``; 512 space-separated fixed-precision floats),
- ``test_a.csv`` (``userid,feedid,device``; day 15, with cold-start feeds),

and, kept apart so no training file ever carries it, the oracle:

- ``oracle/oracle_train.parquet``: ``row`` (0-based data row of user_action.csv), userid,
  feedid, date_, device, ``p_<action>`` (true probability of each of the 7 actions),
- ``oracle/oracle_test_a.parquet``: ``row`` (0-based data row of test_a.csv), userid, feedid,
  date_ (=15), device, ``p_<action>``, the sampled labels ``<action>``, play and stay,
- ``_GENERATED.json``: seed, scale, resolved config, row counts, rates, per-day intercepts,
  and each file's size and SHA-256 (``preprocess`` checks the files it reads against them).

The folder is built next to ``--out`` and swapped in whole (:mod:`pipeline.publish`): a killed
run never leaves a mix of two datasets; an existing ``--out`` is replaced only if it holds this
generator's manifest.

The planted model, for action k on an impression (user u, feed f, device d, day t):

    logit_k = b_{k,t} + sigma * [ sqrt(s_int) <w_k, U_u * F_f> + sqrt(s_user) a^user_{u,k}
              + sqrt(s_feed) a^feed_{f,k} + sqrt(s_author) a^author_{author(f),k}
              + sqrt(s_emb) <v_k, z_f> + sqrt(s_song) a^song_{song(f),k} (0 without bgm)
              + sqrt(s_tag) sum_{tag in manual_tag_list(f)} a^tag_{tag,k} / sqrt(#tags)
              + sqrt(s_kw) sum_{kw in manual+machine keywords(f)} a^kw_{kw,k} / sqrt(#kws)
              + sqrt(s_dev) a^dev_{d,k} ]
              + beta * log1p(H_t(u, author(f)))

Every per-task random effect and task direction is ``sqrt(r) e_0 + sqrt(1-r) (sqrt(1-c) e_k +
sqrt(c) s_k e_c)`` with unit-variance independent parts, so the correlation between two tasks'
contributions is ``r + (1-r) c s_j s_k`` (r = ``task_relatedness``, c = ``conflict_share``,
s_k = +-1 the conflict signs): shared structure grows with r, the conflict direction pulls
opposite-sign tasks apart (MMoE paper's synthetic construction, cosine = relatedness).
``H_t(u, a)`` counts the earlier-day impressions on which user u took any action on author a's
feeds, so history features carry real signal. ``z_f`` is the feed's content latent; the 512-dim
``feed_embedding`` is a noisy linear image of it, so PCA of the embedding recovers signal.
``b_{k,t}`` is solved per day (safeguarded Newton/bisection) so the mean true probability on
that day's impressions equals the target rate (real preliminary-round rates by default).
Labels are independent Bernoulli draws given the logits. ``play`` = watch ratio x
videoplayseconds x 1000 (log-normal ratio rising with the row's mean task logit, 12 % quick
skips, capped at 6 plays); ``stay`` = play + browsing time (+ longer after read_comment/comment).
Impressions: per-user totals log-normal (capped at ``max_actions_per_user``) spread over the
14 days; feeds drawn per day from Zipf base popularity x exp(-age/decay) after a release day;
repeats within a user resampled, then ``duplicate_rate`` explicit repeats. Day 15 (test_a) adds
feeds released that day, their number set so ``cold_start_share`` of distinct test feeds are
unseen in training.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.config import dump_config, load_config
from pipeline.errors import ConfigError
from pipeline.publish import file_digests, publishing

ACTIONS: tuple[str, ...] = (
    "read_comment", "comment", "like", "click_avatar", "forward", "follow", "favorite",
)
#: real preliminary-round positive rates (shared/docs/wechat_2021.md)
REAL_RATES: dict[str, float] = {
    "read_comment": 0.0350, "like": 0.0258, "click_avatar": 0.00753, "forward": 0.00382,
    "favorite": 0.00134, "follow": 0.00072, "comment": 0.00040,
}
USER_ACTION_COLUMNS: tuple[str, ...] = (
    "userid", "feedid", "date_", "device", "read_comment", "comment", "like", "play", "stay",
    "click_avatar", "forward", "follow", "favorite",
)
FEED_INFO_COLUMNS: tuple[str, ...] = (
    "feedid", "authorid", "videoplayseconds", "description", "ocr", "asr", "bgm_song_id",
    "bgm_singer_id", "manual_keyword_list", "machine_keyword_list", "manual_tag_list",
    "machine_tag_list", "description_char", "ocr_char", "asr_char",
)
FEED_EMBEDDING_COLUMNS: tuple[str, ...] = ("feedid", "feed_embedding")
TEST_COLUMNS: tuple[str, ...] = ("userid", "feedid", "device")
EMBEDDING_DIM = 512
TRAIN_DAYS = 14
TEST_DAY = 15
MANIFEST = "_GENERATED.json"
ORACLE_DIR = "oracle"
#: conflict sign per action (same order as ACTIONS): content-engagement vs author-engagement
CONFLICT_SIGNS: tuple[int, ...] = (1, 1, 1, -1, 1, -1, 1)

#: (n_users, n_feeds, n_actions, n_test) per scale; ``full`` = the preliminary round's size
SCALES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (200, 1500, 20_000, 1_200),
    "small": (2_000, 10_000, 500_000, 30_000),
    "full": (20_000, 106_444, 7_317_882, 421_985),
}


class ComponentShares(BaseModel):
    """Variance shares of the logit's components (normalised to sum 1)."""

    model_config = ConfigDict(extra="forbid")
    interaction: float = Field(0.30, ge=0)
    user: float = Field(0.20, ge=0)
    feed: float = Field(0.10, ge=0)
    author: float = Field(0.12, ge=0)
    embedding: float = Field(0.10, ge=0)
    song: float = Field(0.04, ge=0)
    tag: float = Field(0.06, ge=0)
    keyword: float = Field(0.04, ge=0)
    device: float = Field(0.04, ge=0)

    def normalised(self) -> dict[str, float]:
        d = self.model_dump()
        total = sum(d.values())
        if total <= 0:
            raise ValueError("component_shares: at least one share must be > 0")
        return {k: v / total for k, v in d.items()}


class GenerateConfig(BaseModel):
    """Knobs of the generator; ``configs/generate.yaml`` holds the defaults."""

    model_config = ConfigDict(extra="forbid")
    scale: Literal["tiny", "small", "full"] = "tiny"
    seed: int = 0
    n_users: int | None = Field(None, ge=2, description="override the scale preset")
    n_feeds: int | None = Field(None, ge=20)
    n_actions: int | None = Field(None, ge=10)
    n_test: int | None = Field(None, ge=10)
    multiplier: int = Field(1, ge=1, description="user shards: users, actions and test rows times this, "
                                                 "the same feeds; generated and written one shard at a time")
    task_relatedness: float = Field(0.5, ge=0.0, le=1.0)
    conflict_share: float = Field(0.2, ge=0.0, lt=1.0)
    signal_scale: float = Field(1.6, gt=0.0, description="std of the non-intercept logit part")
    history_strength: float = Field(0.6, ge=0.0, description="beta on log1p(user-author count)")
    latent_dim: int = Field(16, ge=len(ACTIONS) + 2)
    component_shares: ComponentShares = ComponentShares()
    target_rates: dict[str, float] = Field(default_factory=lambda: dict(REAL_RATES))
    cold_start_share: float = Field(0.17, ge=0.0, lt=1.0)
    new_feed_row_share: float = Field(0.04, gt=0.0, lt=0.5)
    duplicate_rate: float = Field(0.01, ge=0.0, lt=0.5)
    max_actions_per_user: int = Field(980, ge=1)
    popularity_exponent: float = Field(1.0, gt=0.0)
    popularity_offset: float = Field(30.0, ge=1.0)
    popularity_decay_days: float = Field(6.0, gt=0.0)
    embedding_decimals: int = Field(6, ge=1, le=9)
    embedding_trailing_space: bool = False
    chunk_rows: int = Field(8192, ge=16, description="feed_embeddings rows formatted per chunk")

    @field_validator("target_rates")
    @classmethod
    def _check_rates(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != set(ACTIONS):
            raise ValueError(f"target_rates must have exactly the keys {list(ACTIONS)}, got {sorted(v)}")
        for k, r in v.items():
            if not 0.0 < r < 0.5:
                raise ValueError(f"target_rates.{k}={r} must be in (0, 0.5)")
        return v

    @model_validator(mode="after")
    def _check_sizes(self) -> "GenerateConfig":
        n_users, n_feeds, n_actions, _ = self.sizes()
        if n_actions < n_users:
            raise ValueError(f"n_actions={n_actions} < n_users={n_users}: every user needs >= 1 action")
        if n_actions > n_users * self.max_actions_per_user:
            raise ValueError(
                f"n_actions={n_actions} > n_users*max_actions_per_user={n_users * self.max_actions_per_user}")
        return self

    def sizes(self) -> tuple[int, int, int, int]:
        """(n_users, n_feeds, n_actions, n_test) after overrides."""
        u, f, a, t = SCALES[self.scale]
        return (self.n_users or u, self.n_feeds or f, self.n_actions or a, self.n_test or t)


DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "generate.yaml"


# ----------------------------------------------------------------------------- helpers

def _rng(seed: int, name: str) -> np.random.Generator:
    """An independent, named random stream: adding a stream never shifts another one."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique without return_* takes a slow hash path in numpy 2.4)."""
    s = np.sort(a, kind="stable")
    keep = np.ones(len(s), dtype=bool)
    keep[1:] = s[1:] != s[:-1]
    return s[keep]


def _zipf_weights(rng: np.random.Generator, n: int, alpha: float, offset: float) -> np.ndarray:
    ranks = rng.permutation(n).astype(np.float64)
    return (ranks + offset) ** (-alpha)


def _draw(rng: np.random.Generator, weights: np.ndarray, size: int) -> np.ndarray:
    cum = np.cumsum(weights)
    idx = np.searchsorted(cum, rng.random(size) * cum[-1], side="right")
    return np.minimum(idx, len(weights) - 1)


def _mixed(rng: np.random.Generator, n: int, r: float, c: float) -> np.ndarray:
    """[n, K] unit-variance effects with corr(col j, col k) = r + (1-r) c s_j s_k."""
    k = len(ACTIONS)
    s = np.asarray(CONFLICT_SIGNS, dtype=np.float64)
    e0 = rng.standard_normal((n, 1))
    ek = rng.standard_normal((n, k))
    ec = rng.standard_normal((n, 1))
    return np.sqrt(r) * e0 + np.sqrt(1 - r) * (np.sqrt(1 - c) * ek + np.sqrt(c) * ec * s)


def task_directions(rng: np.random.Generator, dim: int, r: float, c: float) -> np.ndarray:
    """[dim, K] unit task vectors with cos(w_j, w_k) = r + (1-r) c s_j s_k (j != k)."""
    k = len(ACTIONS)
    if dim < k + 2:
        raise ValueError(f"latent_dim={dim} must be >= {k + 2}")
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    s = np.asarray(CONFLICT_SIGNS, dtype=np.float64)
    u0, uk, uc = q[:, :1], q[:, 1:k + 1], q[:, k + 1:k + 2]
    return np.sqrt(r) * u0 + np.sqrt(1 - r) * (np.sqrt(1 - c) * uk + np.sqrt(c) * uc * s)


def _allocate(total: int, weights: np.ndarray, cap: int) -> np.ndarray:
    """Integer counts >= 0, each <= cap, summing to ``total``, roughly proportional to weights."""
    if total > cap * len(weights):
        raise ValueError(f"cannot place {total} items in {len(weights)} slots of capacity {cap}")
    lo, hi = 0.0, float(total) / weights.min() + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.minimum(cap, mid * weights).sum() < total:
            lo = mid
        else:
            hi = mid
    x = np.minimum(cap, hi * weights)
    counts = np.floor(x).astype(np.int64)
    rest = total - int(counts.sum())
    if rest > 0:
        frac = np.where(counts < cap, x - counts, -1.0)
        order = np.argsort(-frac, kind="stable")[:rest]
        counts[order] += 1
    elif rest < 0:
        order = np.argsort(-(counts - x), kind="stable")
        order = order[counts[order] > 0][:-rest]
        counts[order] -= 1
    return counts


def _ragged_unique(rng: np.random.Generator, counts: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row ``counts[i]`` ids drawn by ``weights``, duplicates within a row removed.

    Returns (offsets [n+1], values) with each row's ids in draw order."""
    rows = np.repeat(np.arange(len(counts)), counts)
    vals = _draw(rng, weights, len(rows))
    order = np.lexsort((vals, rows))
    rs, vs = rows[order], vals[order]
    dup_sorted = np.zeros(len(rs), dtype=bool)
    dup_sorted[1:] = (rs[1:] == rs[:-1]) & (vs[1:] == vs[:-1])
    keep = np.ones(len(rows), dtype=bool)
    keep[order[dup_sorted]] = False
    rows, vals = rows[keep], vals[keep]
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=len(counts)), out=offsets[1:])
    return offsets, vals


def _topk_gumbel(rng: np.random.Generator, scores: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, ``counts[i]`` distinct columns sampled without replacement ~ softmax(scores)."""
    kmax = int(counts.max()) if len(counts) else 0
    g = scores + rng.gumbel(size=scores.shape)
    top = np.argpartition(-g, kmax - 1, axis=1)[:, :kmax] if kmax > 0 else np.zeros((len(counts), 0), int)
    topv = np.take_along_axis(g, top, axis=1)
    top = np.take_along_axis(top, np.argsort(-topv, axis=1), axis=1)
    mask = np.arange(kmax)[None, :] < counts[:, None]
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, top[mask]


def _join_lists(offsets: np.ndarray, strings: pa.Array, sep: str) -> pa.Array:
    lists = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), strings)
    return pc.binary_join(lists, pa.scalar(sep, pa.large_string()))


def _ls(value: str) -> pa.Scalar:
    return pa.scalar(value, pa.large_string())


def _int_strings(values: np.ndarray) -> pa.Array:
    return pc.cast(pa.array(np.asarray(values, dtype=np.int64)), pa.large_string())


def fixed_point_strings(x: np.ndarray, decimals: int) -> pa.Array:
    """Format floats with exactly ``decimals`` digits after the point (no exponent), vectorised."""
    scale = 10 ** decimals
    q = np.rint(np.asarray(x, dtype=np.float64) * scale).astype(np.int64)
    neg = q < 0
    a = np.abs(q)
    ip = pc.cast(pa.array(a // scale), pa.large_string())
    fp = pc.utf8_lpad(pc.cast(pa.array(a % scale), pa.large_string()), width=decimals, padding="0")
    sign = pc.if_else(pa.array(neg), pa.scalar("-", pa.large_string()), pa.scalar("", pa.large_string()))
    return pc.binary_join_element_wise(pc.binary_join_element_wise(sign, ip, _ls("")), fp, _ls("."))


def _write_csv(path: Path, columns: tuple[str, ...], arrays: list[pa.Array], *, append: bool = False) -> None:
    """Plain CSV like pandas ``to_csv(index=False)``: unquoted header, unquoted fields, nulls empty."""
    table = pa.table(dict(zip(columns, arrays)))
    mode = "ab" if append else "wb"
    with open(path, mode) as fh:
        if not append:
            fh.write((",".join(columns) + "\n").encode())
        pcsv.write_csv(table, fh, pcsv.WriteOptions(include_header=False, quoting_style="none",
                                                   batch_size=1 << 16))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def solve_intercept(z: np.ndarray, rate: float, tol: float = 1e-10) -> float:
    """b with mean(sigmoid(b + z)) == rate (safeguarded Newton with a bisection bracket)."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate={rate} must be in (0, 1)")
    lo, hi = -60.0 - float(z.max()), 60.0 - float(z.min())
    b = float(np.log(rate / (1 - rate)) - np.median(z))
    for _ in range(100):
        p = _sigmoid(b + z)
        f = float(p.mean()) - rate
        if abs(f) <= tol * rate:
            break
        if f > 0:
            hi = b
        else:
            lo = b
        d = float((p * (1 - p)).mean())
        nb = b - f / d if d > 0 else 0.5 * (lo + hi)
        b = nb if lo < nb < hi else 0.5 * (lo + hi)
    return b


# ----------------------------------------------------------------------------- the world

class _World:
    """All latent quantities of one generated dataset (indices are 0-based internal ids)."""

    def __init__(self, cfg: GenerateConfig):
        self.cfg = cfg
        self.shard = 0
        seed = cfg.seed
        n_users, n_feeds, _, _ = cfg.sizes()
        self.n_users, self.n_feeds = n_users, n_feeds
        r, c, k = cfg.task_relatedness, cfg.conflict_share, len(ACTIONS)
        shares = cfg.component_shares.normalised()
        self.shares = shares
        d = cfg.latent_dim

        rng = _rng(seed, "ids")
        self.userid = np.sort(rng.choice(np.arange(1, max(250_000, 13 * n_users)), n_users, replace=False))
        self.feedid = rng.choice(np.arange(1, max(112_872, int(1.07 * n_feeds) + 2)), n_feeds, replace=False)
        self.n_authors = max(10, int(round(0.177 * n_feeds)))
        self.authorid = rng.choice(np.arange(0, int(1.06 * self.n_authors) + 2), self.n_authors, replace=False)
        self.n_songs = max(10, int(round(0.24 * n_feeds)))
        self.n_singers = max(5, int(round(0.17 * n_feeds)))
        self.songid = rng.choice(np.arange(0, int(1.05 * self.n_songs) + 2), self.n_songs, replace=False)
        self.singerid = rng.choice(np.arange(0, int(1.05 * self.n_singers) + 2), self.n_singers, replace=False)

        # --- feeds: author, length, bgm, content latent
        rng = _rng(seed, "feeds")
        author_w = rng.pareto(1.2, self.n_authors) + 0.05
        self.feed_author = _draw(rng, author_w, n_feeds)
        vps = np.clip(np.rint(np.exp(rng.normal(np.log(22.0), 0.55, n_feeds))), 2, 60)
        long_ = rng.random(n_feeds) < 0.015
        vps[long_] = rng.integers(61, 301, long_.sum())
        self.vps = vps.astype(np.int64)
        song_singer = _draw(rng, rng.pareto(1.0, self.n_singers) + 0.1, self.n_songs)
        self.feed_song = _draw(rng, _zipf_weights(rng, self.n_songs, 1.0, 5.0), n_feeds)
        self.feed_singer = song_singer[self.feed_song]
        self.has_bgm = rng.random(n_feeds) >= 0.14
        author_content = rng.standard_normal((self.n_authors, d))
        self.content = (np.sqrt(0.5) * author_content[self.feed_author]
                        + np.sqrt(0.5) * rng.standard_normal((n_feeds, d)))
        author_factor = rng.standard_normal((self.n_authors, d))
        proj, _ = np.linalg.qr(rng.standard_normal((d, d)))
        self.feed_factor = (np.sqrt(0.4) * author_factor[self.feed_author]
                            + np.sqrt(0.4) * self.content @ proj
                            + np.sqrt(0.2) * rng.standard_normal((n_feeds, d)))
        self.emb_basis = rng.standard_normal((d, EMBEDDING_DIM)) / np.sqrt(d)

        # --- release days: old feeds within/before the window, a reserved pool new on day 15
        rng = _rng(seed, "release")
        self.n_new_pool = max(5, int(round(0.15 * n_feeds)))
        self.release = rng.integers(-int(2 * cfg.popularity_decay_days), TRAIN_DAYS + 1, n_feeds)
        self.new_pool = rng.choice(n_feeds, self.n_new_pool, replace=False)
        self.release[self.new_pool] = TEST_DAY
        self.base_pop = _zipf_weights(rng, n_feeds, cfg.popularity_exponent, cfg.popularity_offset)

        # --- keywords and tags
        rng = _rng(seed, "tags")
        self.n_tags = max(20, min(350, n_feeds // 4))
        self.n_keywords = max(50, int(round(0.26 * n_feeds)))
        tag_proto = rng.standard_normal((d, self.n_tags)) * 0.8
        scores = (self.content @ tag_proto) / np.sqrt(d) * 2.0
        n_manual_tags = np.where(rng.random(n_feeds) < 0.02, 0, 1 + rng.poisson(1.3, n_feeds))
        self.manual_tags = _topk_gumbel(rng, scores, np.minimum(n_manual_tags, self.n_tags))
        n_machine_tags = np.where(rng.random(n_feeds) < 0.015, 0, 1 + rng.poisson(3.0, n_feeds))
        self.machine_tags = _topk_gumbel(rng, scores, np.minimum(n_machine_tags, self.n_tags))
        self.machine_tag_prob = rng.beta(1.2, 2.0, len(self.machine_tags[1]))
        kw_w = _zipf_weights(rng, self.n_keywords, 1.0, 10.0)
        n_manual_kw = np.where(rng.random(n_feeds) < 0.35, 0, 1 + rng.poisson(1.8, n_feeds))
        self.manual_kw = _ragged_unique(rng, n_manual_kw, kw_w)
        n_machine_kw = np.where(rng.random(n_feeds) < 0.2, 0, 1 + rng.poisson(2.5, n_feeds))
        self.machine_kw = _ragged_unique(rng, n_machine_kw, kw_w)

        # --- users
        rng = _rng(seed, "users")
        self.user_factor = rng.standard_normal((n_users, d))
        self.user_device = np.where(rng.random(n_users) < 0.62, 2, 1)
        self.user_activity = np.exp(rng.normal(0.0, 1.0, n_users))

        # --- planted per-task effects
        rng = _rng(seed, "effects")
        self.W = task_directions(rng, d, r, c)
        self.V = task_directions(rng, d, r, c)
        sh = {key: np.sqrt(val) for key, val in shares.items()}
        user_part = sh["user"] * _mixed(rng, n_users, r, c)
        feed_part = sh["feed"] * _mixed(rng, n_feeds, r, c)
        feed_part += sh["author"] * _mixed(rng, self.n_authors, r, c)[self.feed_author]
        emb_eff = self.content @ self.V
        feed_part += sh["embedding"] * emb_eff
        song_eff = _mixed(rng, self.n_songs, r, c)[self.feed_song]
        feed_part += sh["song"] * np.where(self.has_bgm[:, None], song_eff, 0.0)
        tag_eff = _mixed(rng, self.n_tags, r, c)
        kw_eff = _mixed(rng, self.n_keywords, r, c)
        feed_part += sh["tag"] * self._ragged_sum(self.manual_tags, tag_eff)
        kw_sum = self._ragged_sum(self.manual_kw, kw_eff, normalise=False)
        kw_sum += self._ragged_sum(self.machine_kw, kw_eff, normalise=False)
        n_kw = np.diff(self.manual_kw[0]) + np.diff(self.machine_kw[0])
        feed_part += sh["keyword"] * kw_sum / np.sqrt(np.maximum(n_kw, 1))[:, None]
        self.device_part = np.zeros((3, k))
        self.device_part[1:] = sh["device"] * _mixed(rng, 2, r, c)
        self.user_part, self.feed_part = user_part, feed_part
        self.sigma = cfg.signal_scale
        self.sh_int = sh["interaction"]

    def stream(self, name: str) -> np.random.Generator:
        """The named random stream of this world's user shard (shard 0: the plain stream)."""
        return _rng(self.cfg.seed, name if self.shard == 0 else f"{name}/{self.shard}")

    def user_shard(self, shard: int) -> "_World":
        """The same feeds, authors and task effects with shard ``shard``'s own users: new ids
        (offset past every id of the shards before), factors, devices, activity and effects.

        Args:
            shard: 0 is this world itself.
        """
        if shard == 0:
            return self
        w = copy.copy(self)
        w.shard = shard
        n, cfg = self.n_users, self.cfg
        w.userid = self.userid + shard * max(250_000, 13 * n)
        rng = _rng(cfg.seed, f"users/{shard}")
        w.user_factor = rng.standard_normal((n, cfg.latent_dim))
        w.user_device = np.where(rng.random(n) < 0.62, 2, 1)
        w.user_activity = np.exp(rng.normal(0.0, 1.0, n))
        w.user_part = np.sqrt(self.shares["user"]) * _mixed(rng, n, cfg.task_relatedness, cfg.conflict_share)
        return w

    def _ragged_sum(self, ragged: tuple[np.ndarray, np.ndarray], eff: np.ndarray,
                    normalise: bool = True) -> np.ndarray:
        offsets, vals = ragged
        counts = np.diff(offsets)
        rows = np.repeat(np.arange(len(counts)), counts)
        out = np.zeros((len(counts), eff.shape[1]))
        for j in range(eff.shape[1]):
            out[:, j] = np.bincount(rows, weights=eff[vals, j], minlength=len(counts))
        if normalise:
            out /= np.sqrt(np.maximum(counts, 1))[:, None]
        return out

    def popularity(self, day: int) -> np.ndarray:
        age = day - self.release
        w = self.base_pop * np.exp(-np.maximum(age, 0) / self.cfg.popularity_decay_days)
        return np.where(age >= 0, w, 0.0)

    def static_logits(self, u: np.ndarray, f: np.ndarray, dev: np.ndarray) -> np.ndarray:
        """sigma * (all non-history, non-intercept components) for impressions (u, f, dev)."""
        inter = (self.user_factor[u] * self.feed_factor[f]) @ self.W
        z = self.sh_int * inter + self.user_part[u] + self.feed_part[f] + self.device_part[dev]
        return self.sigma * z


# ----------------------------------------------------------------------------- impressions

def _dedupe_within_user(rng: np.random.Generator, world: _World, user: np.ndarray, feed: np.ndarray,
                        day: np.ndarray, rounds: int = 3, pop: dict[int, np.ndarray] | None = None) -> None:
    """Resample the feed of later repeats of a (user, feed) pair (in place, a few rounds);
    ``pop`` overrides the popularity of a day."""
    for _ in range(rounds):
        key = user.astype(np.int64) * world.n_feeds + feed
        _, first = np.unique(key, return_index=True)
        dup = np.ones(len(key), dtype=bool)
        dup[first] = False
        if not dup.any():
            return
        for t in _unique(day[dup]):
            idx = np.flatnonzero(dup & (day == t))
            w = pop[int(t)] if pop and int(t) in pop else world.popularity(int(t))
            feed[idx] = _draw(rng, w, len(idx))


def _train_impressions(world: _World) -> dict[str, np.ndarray]:
    cfg = world.cfg
    n_users, _, n_actions, _ = cfg.sizes()
    rng = world.stream("impressions")
    per_user = 1 + _allocate(n_actions - n_users, world.user_activity, cfg.max_actions_per_user - 1)
    day_w = rng.gamma(0.7, 1.0, (n_users, TRAIN_DAYS)) + 1e-3
    per_user_day = rng.multinomial(per_user, day_w / day_w.sum(axis=1, keepdims=True))
    flat = per_user_day.ravel()
    user = np.repeat(np.repeat(np.arange(n_users), TRAIN_DAYS), flat)
    day = np.repeat(np.tile(np.arange(1, TRAIN_DAYS + 1), n_users), flat)
    feed = np.empty(len(user), dtype=np.int64)
    for t in range(1, TRAIN_DAYS + 1):
        idx = np.flatnonzero(day == t)
        feed[idx] = _draw(rng, world.popularity(t), len(idx))
    _dedupe_within_user(rng, world, user, feed, day)
    # explicit repeats: a later row shows a feed the user already saw earlier (same or earlier day)
    start = np.repeat(np.concatenate([[0], np.cumsum(per_user)[:-1]]), per_user)
    pos = np.arange(len(user))
    cand = np.flatnonzero(pos > start)
    n_dup = min(len(cand), int(round(cfg.duplicate_rate * len(user))))
    if n_dup:
        rows = np.sort(rng.choice(cand, n_dup, replace=False))
        src = start[rows] + np.floor(rng.random(n_dup) * (rows - start[rows])).astype(np.int64)
        feed[rows] = feed[src]  # src < row, same user: a feed the user was shown before
    device = np.where(rng.random(len(user)) < 0.97, world.user_device[user], 3 - world.user_device[user])
    return {"user": user, "feed": feed, "day": day, "device": device}


def _test_impressions(world: _World, train_feeds: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    cfg = world.cfg
    _, _, _, n_test = cfg.sizes()
    rng = world.stream("test")
    counts = np.bincount(_draw(rng, world.user_activity, n_test), minlength=world.n_users)
    user = np.repeat(np.arange(world.n_users), counts)
    day = np.full(n_test, TEST_DAY)
    pop = world.popularity(TEST_DAY)
    pop[world.new_pool] = 0.0
    feed = _draw(rng, pop, n_test)
    _dedupe_within_user(rng, world, user, feed, day, rounds=2, pop={TEST_DAY: pop})
    in_train = np.zeros(world.n_feeds, dtype=bool)
    in_train[train_feeds] = True
    s = cfg.cold_start_share

    def n_new_for(mask: np.ndarray) -> int:
        old_feeds = _unique(feed[mask])
        d_old, d_old_cold = len(old_feeds), int((~in_train[old_feeds]).sum())
        return int(round((s * d_old - d_old_cold) / (1 - s)))

    # rows given to day-15 feeds: enough for every new feed to get at least one (two passes:
    # estimate on all rows, then recount once those rows are taken away from old feeds)
    want = n_new_for(np.ones(n_test, dtype=bool))
    m_new = int(np.clip(max(round(cfg.new_feed_row_share * n_test), int(np.ceil(1.5 * want))), 1, n_test // 2))
    new_rows = np.sort(rng.choice(n_test, m_new, replace=False))
    old_mask = np.ones(n_test, dtype=bool)
    old_mask[new_rows] = False
    n_new = int(np.clip(n_new_for(old_mask), 1, min(m_new, world.n_new_pool)))
    pool = world.new_pool[rng.permutation(world.n_new_pool)[:n_new]]
    # every chosen new feed gets one row, the rest follow a Zipf popularity among them
    assign = np.concatenate([np.arange(n_new),
                             _draw(rng, _zipf_weights(rng, n_new, 1.0, 3.0), m_new - n_new)])
    feed[new_rows] = pool[rng.permutation(assign)]
    device = np.where(rng.random(n_test) < 0.97, world.user_device[user], 3 - world.user_device[user])
    test_feeds = _unique(feed)
    info = {"test_distinct_feeds": int(len(test_feeds)),
            "test_cold_feeds": int((~in_train[test_feeds]).sum()),
            "new_feeds_on_day_15": n_new}
    info["test_cold_share"] = info["test_cold_feeds"] / info["test_distinct_feeds"]
    return {"user": user, "feed": feed, "day": day, "device": device}, info


# ----------------------------------------------------------------------------- labels

def _labels(world: _World, imp: dict[str, np.ndarray], days: list[int], rng: np.random.Generator,
            hist: tuple[np.ndarray, np.ndarray], intercepts: dict[str, list[float | None]]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Per day: logits -> intercepts -> probabilities -> labels; update the user-author history.

    Returns (p [n,K] float32, labels [n,K] int8, play, stay, history)."""
    cfg = world.cfg
    n, k = len(imp["user"]), len(ACTIONS)
    p_all = np.empty((n, k), dtype=np.float32)
    y_all = np.empty((n, k), dtype=np.int8)
    play = np.empty(n, dtype=np.int64)
    stay = np.empty(n, dtype=np.int64)
    hk, hc = hist
    author = world.feed_author[imp["feed"]]
    for t in days:
        idx = np.flatnonzero(imp["day"] == t)
        if len(idx) == 0:  # only possible at toy sizes
            for act in ACTIONS:
                intercepts[act].append(None)
            continue
        u, f, dev = imp["user"][idx], imp["feed"][idx], imp["device"][idx]
        z = world.static_logits(u, f, dev)
        key = u.astype(np.int64) * world.n_authors + author[idx]
        pos = np.minimum(np.searchsorted(hk, key), max(len(hk) - 1, 0))
        h = np.where((len(hk) > 0) & (hk[pos] == key), hc[pos], 0.0) if len(hk) else np.zeros(len(key))
        z_tot = z + cfg.history_strength * np.log1p(h)[:, None]
        p = np.empty_like(z_tot)
        for j, a in enumerate(ACTIONS):
            b = solve_intercept(z_tot[:, j], cfg.target_rates[a])
            intercepts[a].append(round(b, 6))
            p[:, j] = _sigmoid(b + z_tot[:, j])
        y = (rng.random(p.shape) < p).astype(np.int8)
        p_all[idx], y_all[idx] = p, y
        # watch time: more interest -> longer play; stay >= play (+ time in comments)
        interest = z.mean(axis=1)
        interest = (interest - interest.mean()) / (interest.std() + 1e-9)
        ratio = np.exp(rng.normal(-0.5 + 0.35 * interest, 0.7))
        skip = rng.random(len(idx)) < 0.12
        ratio = np.where(skip, rng.uniform(0.0, 0.15, len(idx)), np.minimum(ratio, 6.0))
        vms = world.vps[f] * 1000
        pl = np.rint(ratio * vms).astype(np.int64)
        extra = np.rint(np.exp(rng.normal(np.log(1500.0), 0.8, len(idx)))).astype(np.int64)
        extra += y[:, ACTIONS.index("read_comment")] * rng.integers(2000, 30000, len(idx))
        extra += y[:, ACTIONS.index("comment")] * rng.integers(5000, 60000, len(idx))
        play[idx], stay[idx] = pl, pl + extra
        acted = y.any(axis=1)
        if acted.any():
            allk = np.concatenate([hk, key[acted]])
            allc = np.concatenate([hc, np.ones(int(acted.sum()))])
            hk, inv = np.unique(allk, return_inverse=True)
            hc = np.bincount(inv, weights=allc)
    return p_all, y_all, play, stay, (hk, hc)


# ----------------------------------------------------------------------------- writers

def _write_feed_info(path: Path, world: _World) -> None:
    rng = _rng(world.cfg.seed, "text")
    n = world.n_feeds
    n_words, n_chars = max(1000, 14 * n // 10), max(500, n // 3)
    word_w = _zipf_weights(rng, n_words, 1.05, 20.0)
    char_w = _zipf_weights(rng, n_chars, 1.0, 5.0)
    cols: dict[str, pa.Array] = {}
    for name, p_empty, lam in (("description", 0.05, 16.0), ("ocr", 0.35, 14.0), ("asr", 0.30, 30.0)):
        empty = rng.random(n) < p_empty
        nw = np.where(empty, 0, 1 + rng.poisson(lam - 1, n))
        nc = np.where(empty, 0, np.maximum(1, np.rint(nw * rng.uniform(1.3, 2.0, n)).astype(np.int64)))
        for suffix, counts, w in (("", nw, word_w), ("_char", nc, char_w)):
            rows = np.repeat(np.arange(n), counts)
            vals = _draw(rng, w, len(rows))
            off = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(counts, out=off[1:])
            cols[name + suffix] = _join_lists(off, _int_strings(vals), " ")
    song = pa.array(world.songid[world.feed_song], mask=~world.has_bgm)
    singer = pa.array(world.singerid[world.feed_singer], mask=~world.has_bgm)

    def ids(ragged: tuple[np.ndarray, np.ndarray]) -> pa.Array:
        return _join_lists(ragged[0], _int_strings(ragged[1]), ";")

    mt_off, mt_vals = world.machine_tags
    pairs = pc.binary_join_element_wise(_int_strings(mt_vals),
                                        fixed_point_strings(world.machine_tag_prob, 4), _ls(" "))
    arrays = [
        pa.array(world.feedid), pa.array(world.authorid[world.feed_author]), pa.array(world.vps),
        cols["description"], cols["ocr"], cols["asr"], song, singer,
        ids(world.manual_kw), ids(world.machine_kw), ids(world.manual_tags),
        _join_lists(mt_off, pairs, ";"),
        cols["description_char"], cols["ocr_char"], cols["asr_char"],
    ]
    _write_csv(path, FEED_INFO_COLUMNS, arrays)


def _write_embeddings(path: Path, world: _World) -> None:
    cfg = world.cfg
    rng = _rng(cfg.seed, "embedding")
    n, dim = world.n_feeds, EMBEDDING_DIM
    with open(path, "wb") as fh:
        fh.write((",".join(FEED_EMBEDDING_COLUMNS) + "\n").encode())
    for s in range(0, n, cfg.chunk_rows):
        e = slice(s, min(n, s + cfg.chunk_rows))
        m = e.stop - e.start
        x = world.content[e] @ world.emb_basis + 0.6 * rng.standard_normal((m, dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        strs = fixed_point_strings(x.ravel(), cfg.embedding_decimals)
        joined = _join_lists(np.arange(0, m * dim + 1, dim, dtype=np.int64), strs, " ")
        if cfg.embedding_trailing_space:
            joined = pc.binary_join_element_wise(joined, _ls(""), _ls(" "))
        _write_csv(path, FEED_EMBEDDING_COLUMNS, [pa.array(world.feedid[e]), joined], append=True)


# ----------------------------------------------------------------------------- driver

def _oracle_table(uid: np.ndarray, fid: np.ndarray, imp: dict[str, np.ndarray], p: np.ndarray,
                  extra: dict[str, pa.Array], first_row: int) -> pa.Table:
    cols = {"row": pa.array(np.arange(first_row, first_row + len(uid), dtype=np.int64)), "userid": pa.array(uid),
            "feedid": pa.array(fid), "date_": pa.array(imp["day"].astype(np.int64)),
            "device": pa.array(imp["device"])}
    cols.update({f"p_{a}": pa.array(p[:, j]) for j, a in enumerate(ACTIONS)})
    cols.update(extra)
    return pa.table(cols)


def _append_parquet(path: Path, table: pa.Table) -> None:
    """Append ``table`` as new row groups (a shard at a time: the file is never held whole)."""
    parts = path.parent / (path.name + ".parts")
    parts.mkdir(exist_ok=True)
    pq.write_table(table, parts / f"{len(list(parts.iterdir())):05d}.parquet")


def _merge_parquet_parts(path: Path) -> None:
    """Join the appended parts of ``path`` into one file, streaming row groups."""
    parts = path.parent / (path.name + ".parts")
    files = sorted(parts.iterdir())
    with pq.ParquetWriter(path, pq.read_schema(files[0])) as writer:
        for f in files:
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                writer.write_table(pf.read_row_group(g))
    for f in files:
        f.unlink()
    parts.rmdir()


def _write_shard(world: _World, tmp: Path, tick: Any, rows_before: tuple[int, int]) -> dict[str, Any]:
    """Impressions, labels and files of one user shard, appended to the shards before;
    returns the shard's summary for the manifest.

    Args:
        world: the shard's world; tmp: the folder being built; tick: the step timer;
        rows_before: data rows of user_action.csv and test_a.csv written by earlier shards.
    """
    cfg = world.cfg
    first = world.shard > 0

    def step(name: str) -> None:
        tick(name if world.shard == 0 else f"{name}/{world.shard}")

    train = _train_impressions(world)
    test, test_info = _test_impressions(world, _unique(train["feed"]))
    step("impressions")
    intercepts: dict[str, list[float | None]] = {a: [] for a in ACTIONS}
    rng = world.stream("labels")
    hist = (np.zeros(0, dtype=np.int64), np.zeros(0))
    p_tr, y_tr, play_tr, stay_tr, hist = _labels(world, train, list(range(1, TRAIN_DAYS + 1)), rng, hist, intercepts)
    p_te, y_te, play_te, stay_te, _ = _labels(world, test, [TEST_DAY], rng, hist, intercepts)
    step("labels")
    uid_tr, fid_tr = world.userid[train["user"]], world.feedid[train["feed"]]
    label_cols = {a: pa.array(y_tr[:, j]) for j, a in enumerate(ACTIONS)}
    ua = {"userid": pa.array(uid_tr), "feedid": pa.array(fid_tr), "date_": pa.array(train["day"]),
          "device": pa.array(train["device"]), "play": pa.array(play_tr), "stay": pa.array(stay_tr), **label_cols}
    _write_csv(tmp / "user_action.csv", USER_ACTION_COLUMNS, [ua[c] for c in USER_ACTION_COLUMNS], append=first)
    uid_te, fid_te = world.userid[test["user"]], world.feedid[test["feed"]]
    _write_csv(tmp / "test_a.csv", TEST_COLUMNS, [pa.array(uid_te), pa.array(fid_te), pa.array(test["device"])],
               append=first)
    step("write_user_action_test")
    te_extra = {a: pa.array(y_te[:, j]) for j, a in enumerate(ACTIONS)}
    te_extra.update({"play": pa.array(play_te), "stay": pa.array(stay_te)})
    tables = {"oracle_train.parquet": _oracle_table(uid_tr, fid_tr, train, p_tr, {}, rows_before[0]),
              "oracle_test_a.parquet": _oracle_table(uid_te, fid_te, test, p_te, te_extra, rows_before[1])}
    for name, table in tables.items():
        path = tmp / ORACLE_DIR / name
        if cfg.multiplier == 1:
            pq.write_table(table, path)
        else:
            _append_parquet(path, table)
            if world.shard == cfg.multiplier - 1:
                _merge_parquet_parts(path)
    step("write_oracle")
    key = uid_tr.astype(np.int64) * (int(world.feedid.max()) + 1) + fid_tr
    return {
        "rows": (int(len(uid_tr)), int(len(uid_te))), "users": int(len(_unique(uid_tr))), "train_feeds": _unique(fid_tr),
        "duplicate_rows": int(len(key) - len(_unique(key))), "max_actions_per_user": int(np.bincount(train["user"]).max()),
        "test_info": test_info, "intercepts": intercepts,
        "sums": {"rates_train": y_tr.sum(axis=0, dtype=np.float64), "oracle_mean_p_train": p_tr.astype(np.float64).sum(axis=0),
                 "rates_test": y_te.sum(axis=0, dtype=np.float64)},
    }


def _shard_summary(shards: list[dict[str, Any]], world: _World) -> dict[str, Any]:
    """The manifest's counts and rates over all shards (shard 0's test and intercept details;
    with several shards, each shard's as lists)."""
    n_tr = sum(s["rows"][0] for s in shards)
    n_te = sum(s["rows"][1] for s in shards)
    total = {k: sum(s["sums"][k] for s in shards) for k in shards[0]["sums"]}
    out = {
        "rows": {"user_action": n_tr, "feed_info": world.n_feeds, "feed_embeddings": world.n_feeds, "test_a": n_te},
        "users": sum(s["users"] for s in shards),
        "train_feeds": int(len(_unique(np.concatenate([s["train_feeds"] for s in shards])))),
        "duplicate_rows": sum(s["duplicate_rows"] for s in shards),
        "max_actions_per_user": max(s["max_actions_per_user"] for s in shards),
        **shards[0]["test_info"],
        "rates_train": {a: float(total["rates_train"][j] / n_tr) for j, a in enumerate(ACTIONS)},
        "oracle_mean_p_train": {a: float(total["oracle_mean_p_train"][j] / n_tr) for j, a in enumerate(ACTIONS)},
        "rates_test": {a: float(total["rates_test"][j] / n_te) for j, a in enumerate(ACTIONS)},
        "intercepts_by_day": shards[0]["intercepts"],
    }
    if len(shards) > 1:  # per-day intercepts are solved per shard (each shard's rows hit the rates)
        out["shards"] = [{"rows": s["rows"], "intercepts_by_day": s["intercepts"], **s["test_info"]} for s in shards]
    return out


def build_config(scale: str | None = None, seed: int | None = None, config_path: str | Path | None = None,
                 overrides: list[str] | None = None, **fields: Any) -> GenerateConfig:
    """Config from YAML (default ``configs/generate.yaml`` when present) + ``key=value`` overrides
    + keyword fields (``scale``/``seed`` and any GenerateConfig field)."""
    if config_path is None and DEFAULT_CONFIG_PATH.is_file():
        config_path = DEFAULT_CONFIG_PATH
    cfg = load_config(GenerateConfig, config_path, overrides or [])
    data = cfg.model_dump()
    if scale is not None:
        data["scale"] = scale
    if seed is not None:
        data["seed"] = seed
    data.update(fields)
    try:
        return GenerateConfig.model_validate(data)
    except ValidationError as exc:  # from scale/seed/fields: the file and --set were checked above
        raise ConfigError(f"invalid generate config: {exc}") from None


def generate(out_dir: str | Path, scale: str = "tiny", seed: int = 0, *, config: GenerateConfig | None = None,
             verbose: bool = False, **overrides: Any) -> Path:
    """Write a WeChat-format dataset with its oracle into ``out_dir`` and return the path.

    Args:
        out_dir: destination directory, replaced as a whole if this generator wrote it (any
            other non-empty folder is refused with an OutputError).
        scale: ``tiny``, ``small`` or ``full`` (ignored when ``config`` is given).
        seed: random seed; the same seed and config give byte-identical files.
        config: a full GenerateConfig (takes precedence over scale/seed/overrides).
        verbose: print per-step timings to stderr.
        **overrides: any GenerateConfig field, e.g. ``task_relatedness=0.9, n_users=300``.
    """
    if config is None:
        config = GenerateConfig.model_validate({**GenerateConfig().model_dump(), "scale": scale, "seed": seed,
                                                **overrides})
    return _run(config, Path(out_dir), verbose)[0]


def _is_generate_output(folder: Path) -> bool:
    """Written by this generator (its manifest says so): only such a folder is replaced."""
    try:
        return json.loads((folder / MANIFEST).read_text()).get("generator") == "pipeline.generate"
    except (OSError, ValueError, AttributeError):
        # a first run of an older version, killed, left only its build folder inside
        return all(p.name.startswith(".tmp-generate-") and p.is_dir() for p in folder.iterdir())


def _run(cfg: GenerateConfig, out: Path, verbose: bool) -> tuple[Path, dict[str, float]]:
    """Generate into ``out`` atomically; returns (out, seconds per step)."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def tick(name: str) -> None:
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 3)
        if verbose:
            print(f"[generate] {name}: {timings[name]:.2f}s", file=sys.stderr, flush=True)

    out = out.resolve()
    with publishing(out, "generate", _is_generate_output, MANIFEST) as (tmp, _stale):
        (tmp / ORACLE_DIR).mkdir()
        world = _World(cfg)
        tick("world")
        shards: list[dict[str, Any]] = []
        for k in range(cfg.multiplier):  # one shard's rows in memory at a time
            before = (sum(s["rows"][0] for s in shards), sum(s["rows"][1] for s in shards))
            shards.append(_write_shard(world.user_shard(k), tmp, tick, before))
        _write_feed_info(tmp / "feed_info.csv", world)
        tick("write_feed_info")
        _write_embeddings(tmp / "feed_embeddings.csv", world)
        tick("write_feed_embeddings")
        manifest = {
            "generator": "pipeline.generate", "format": "wechat_algo_data1",
            "seed": cfg.seed, "scale": cfg.scale,
            "config": cfg.model_dump(mode="json"),
            **_shard_summary(shards, world),
            "target_rates": cfg.target_rates,
            # size and SHA-256 per file: preprocess checks the files it reads against them
            "files": file_digests(tmp, ["user_action.csv", "feed_info.csv", "feed_embeddings.csv", "test_a.csv",
                                        f"{ORACLE_DIR}/oracle_train.parquet", f"{ORACLE_DIR}/oracle_test_a.parquet"]),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        tick("manifest")
    tick("publish")  # the whole folder swapped in at once: never a mix of two datasets
    if verbose:
        print(f"[generate] total: {time.perf_counter() - t0:.2f}s -> {out}", file=sys.stderr, flush=True)
    return out, timings


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (e.g. data/wechat_algo_data1)")
    parser.add_argument("--scale", choices=sorted(SCALES), default=None,
                        help="size preset (default: the config's, tiny)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the config's, 0)")
    parser.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG_PATH.name})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set task_relatedness=0.9 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no timings on stderr")


def run(args: argparse.Namespace) -> int:
    cfg = build_config(args.scale, args.seed, args.config, args.overrides)
    if not args.quiet:
        print(dump_config(cfg), file=sys.stderr, end="")
    t0 = time.perf_counter()
    out, timings = _run(cfg, Path(args.out), verbose=not args.quiet)
    manifest = json.loads((out / MANIFEST).read_text())
    sizes = {rel: (out / rel).stat().st_size for rel in [*manifest["files"], MANIFEST]}
    print(json.dumps({"out": str(out), "seconds": round(time.perf_counter() - t0, 2),
                      "step_seconds": timings, "rows": manifest["rows"], "bytes": sizes,
                      "rates_train": manifest["rates_train"],
                      "test_cold_share": manifest["test_cold_share"]}, indent=1))
    return 0
