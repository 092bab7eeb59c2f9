"""SYNTHETIC data in the file format of MovieLens ml-latest-small (``ratings.csv``,
``movies.csv``), for tests of ``configs/datasets/movielens.yaml``. Not MovieLens data: users,
movies, titles and ratings are drawn from a seeded random model (ratings depend on a user bias,
a movie quality and the user's taste for the movie's genres, so there is something to learn).

Format as documented in ml-latest-small's README: CSV with a header, ``userId,movieId,rating,
timestamp`` (ratings 0.5..5.0 in half stars written ``4.0``, Unix seconds) and
``movieId,title,genres`` (titles quoted when they hold a comma, genres ``|``-separated or
``(no genres listed)``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

GENRES = ["Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def write_synthetic_movielens(folder: Path, users: int = 300, movies: int = 400, per_user: int = 60,
                              seed: int = 0) -> Path:
    """Write ``ratings.csv`` and ``movies.csv`` (synthetic, ml-latest-small format) into ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    movie_ids = np.sort(rng.choice(np.arange(1, 200_000), size=movies, replace=False))
    movie_genres = []
    with (folder / "movies.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["movieId", "title", "genres"])
        for k, m in enumerate(movie_ids):
            g = sorted(rng.choice(len(GENRES), size=rng.integers(0, 4), replace=False).tolist())
            movie_genres.append(g)
            title = f"Synthetic Movie {k}, The ({1950 + k % 68})" if k % 5 == 0 else f"Synthetic Movie {k} ({1950 + k % 68})"
            w.writerow([int(m), title, "|".join(GENRES[i] for i in g) if g else "(no genres listed)"])
    quality = rng.normal(0, 0.6, movies)
    taste = rng.normal(0, 0.8, (users, len(GENRES)))
    bias = rng.normal(0, 0.5, users)
    rows = []
    for u in range(users):
        start = int(rng.integers(946_684_800, 1_530_000_000))  # 2000-01-01 .. mid 2018
        seen = rng.choice(movies, size=min(per_user, movies), replace=False)
        t = start
        for m in seen:
            t += int(rng.choice([0, 1, 5, 30, 300, 86_400 * 7], p=[0.1, 0.2, 0.3, 0.25, 0.1, 0.05]))  # ties too
            g = movie_genres[m]
            score = 3.4 + bias[u] + quality[m] + (taste[u, g].mean() if g else 0.0) + rng.normal(0, 0.5)
            rating = float(np.clip(np.round(score * 2) / 2, 0.5, 5.0))
            rows.append((u + 1, int(movie_ids[m]), rating, t))
    rows.sort(key=lambda r: (r[0], r[1]))  # ml-latest-small is ordered by userId, then movieId
    with (folder / "ratings.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        for u, m, r, t in rows:
            w.writerow([u, m, f"{r:.1f}", t])
    return folder
