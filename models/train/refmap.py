"""Reference mapping: kNN label transfer over a labelled reference of cell embeddings.

The definitions the Rust side (`cellstream reference`, `embed --reference`) implements;
this module is what the experiments in models/train use. For any model that makes embeddings.

- Embeddings are L2-normalised (as cellstream emits them); distance d(a, b) = 1 - cos(a, b).
- k = 10 nearest reference cells, exact search; equal distances in order of the reference
  cell's index (a stable sort).
- Vote: plain majority among the k (count per label); a tie between labels goes to the label
  that appears first among the neighbours ordered nearest first. m = the winner's votes.
- Calibration table conf[m], m = 1..k, from leave-one-out kNN over the reference (each
  reference cell voted by its k nearest OTHER reference cells): per m, the fraction of those
  cells whose vote was right. Then (1) pooling: scanning m upwards, adjacent m are pooled
  into one group until the group holds >= 20 cells (a last group under 20 joins the one
  before it; m with no cells simply join a group); (2) monotone: adjacent groups whose
  rates decrease with m are pooled (pool-adjacent-violators, rates weighted by cell counts)
  until the rates are non-decreasing. conf[m] = the rate of m's group.
- confidence = conf[m]; novelty = mean distance to the k nearest reference cells divided by
  the 99th percentile (numpy's linear interpolation) of the same quantity over the
  reference's own cells in leave-one-out.
- novelty cut: the 95th percentile (NOVELTY_QUANTILE) of the reference's own leave-one-out
  novelty. Depth cuts (when the reference's cells thinned to 50 / 25 / 10% depth are given,
  embedded again): per depth, the 95th percentile of each thinned cell's novelty against the
  full-depth reference without itself, at the thinned cells' median UMI count; a query's cut
  is interpolated in log(UMIs) between those medians (the ends' cut past them) at its depth:
  cellstream passes the median UMI count of the query's batch. A depth with
  fewer than 20 cells or a median UMI count not below the previous depth's is skipped.
- assigned = confidence >= threshold and novelty <= the query's cut. threshold = the lowest
  value of the table at which, on the leave-one-out reference, the assigned cells (novelty
  within the full-depth cut) are right >= 95% of the time (the highest table value when none
  is).
"""
from __future__ import annotations

import numpy as np

K = 10
MIN_GROUP = 20
NOVELTY_PERCENTILE = 99.0
NOVELTY_QUANTILE = 95.0
MIN_DEPTH_CELLS = 20
PRECISION_TARGET = 0.95


def l2norm(e):
    e = np.asarray(e, np.float64)
    n = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.where(n == 0, 1, n)


def knn(query, ref, k=K, exclude_self=False):
    """(indices [n,k], distances [n,k]) of the k nearest reference rows, nearest first;
    equal distances by reference index. exclude_self: query is ref, row i skips i."""
    q, r = l2norm(query), l2norm(ref)
    idx = np.empty((len(q), k), np.int64)
    dist = np.empty((len(q), k), np.float64)
    for lo in range(0, len(q), 1024):
        d = 1.0 - q[lo:lo + 1024] @ r.T
        if exclude_self:
            d[np.arange(d.shape[0]), np.arange(lo, lo + d.shape[0])] = np.inf
        o = np.argsort(d, axis=1, kind="stable")[:, :k]
        idx[lo:lo + 1024] = o
        dist[lo:lo + 1024] = np.take_along_axis(d, o, 1)
    return idx, dist


def vote(neigh_labels):
    """Per row of neighbour labels (nearest first): (winning label, its vote count)."""
    win = np.empty(len(neigh_labels), dtype=neigh_labels.dtype)
    m = np.empty(len(neigh_labels), np.int64)
    for i, row in enumerate(neigh_labels):
        labs, first, cnt = np.unique(row, return_index=True, return_counts=True)
        best = max(range(len(labs)), key=lambda j: (cnt[j], -first[j]))
        win[i], m[i] = labs[best], cnt[best]
    return win, m


def calibration_table(m, correct, k=K, min_group=MIN_GROUP):
    """conf[m] for m = 0..k (index 0 unused): pooled to >= min_group cells, then monotone."""
    n = np.bincount(m, minlength=k + 1)[1:k + 1].astype(np.float64)
    c = np.bincount(m, weights=correct.astype(np.float64), minlength=k + 1)[1:k + 1]
    groups = []  # [first m, last m, n, correct]
    for j in range(k):
        if groups and groups[-1][2] < min_group:
            g = groups[-1]
            g[1], g[2], g[3] = j + 1, g[2] + n[j], g[3] + c[j]
        else:
            groups.append([j + 1, j + 1, n[j], c[j]])
    if len(groups) > 1 and groups[-1][2] < min_group:
        last = groups.pop()
        groups[-1][1], groups[-1][2], groups[-1][3] = last[1], groups[-1][2] + last[2], groups[-1][3] + last[3]
    rate = lambda g: g[3] / g[2] if g[2] else 0.0
    merged = True
    while merged:  # pool adjacent violators
        merged = False
        for i in range(len(groups) - 1):
            if rate(groups[i]) > rate(groups[i + 1]):
                a, b = groups[i], groups.pop(i + 1)
                a[1], a[2], a[3] = b[1], a[2] + b[2], a[3] + b[3]
                merged = True
                break
    table = np.zeros(k + 1)
    for g in groups:
        table[g[0]:g[1] + 1] = rate(g)
    return table


def choose_threshold(conf, correct, ok_novelty, table, target=PRECISION_TARGET):
    for t in sorted(set(table[1:].tolist())):
        a = (conf >= t) & ok_novelty
        if a.any() and correct[a].mean() >= target:
            return float(t)
    return float(table[1:].max())


class Reference:
    def __init__(self, emb, labels, k=K, umis=None, thinned=()):
        """thinned: (depth, embeddings, umis) per shallower depth, deepest first, rows in the
        reference's order (a row of NaN: a cell thinning left without an embedding)."""
        self.emb = l2norm(emb)
        self.labels = np.asarray(labels)
        self.k = k
        idx, dist = knn(self.emb, self.emb, k, exclude_self=True)
        pred, m = vote(self.labels[idx])
        self.loo_pred, self.loo_m = pred, m
        self.loo_correct = pred == self.labels
        self.table = calibration_table(m, self.loo_correct, k)
        self.loo_meandist = dist.mean(1)
        self.scale = float(np.percentile(self.loo_meandist, NOVELTY_PERCENTILE))
        self.loo_conf = self.table[m]
        self.loo_novelty = self.loo_meandist / self.scale
        self.cut = float(np.percentile(self.loo_novelty, NOVELTY_QUANTILE))
        self.threshold = choose_threshold(self.loo_conf, self.loo_correct,
                                          self.loo_novelty <= self.cut, self.table)
        self.depth_cuts = []  # (depth, median UMIs, cut), deepest first
        if umis is not None and len(thinned):
            self.depth_cuts.append((1.0, float(np.median(umis)), self.cut))
            for depth, temb, tumis in thinned:
                ok = ~np.isnan(np.asarray(temb, np.float64)).any(1)
                q = l2norm(np.asarray(temb)[ok])
                rows = np.flatnonzero(ok)
                d = 1.0 - q @ self.emb.T
                d[np.arange(len(rows)), rows] = np.inf
                md = np.sort(d, 1)[:, :k].mean(1)
                med = float(np.median(np.asarray(tumis)[ok]))
                if len(rows) < MIN_DEPTH_CELLS or med >= self.depth_cuts[-1][1]:
                    continue
                self.depth_cuts.append((depth, med, float(np.percentile(md, NOVELTY_QUANTILE)) / self.scale))
            if len(self.depth_cuts) < 2:
                self.depth_cuts = []

    def cut_at(self, umis):
        """The novelty cut for cells of `umis` UMIs (None: full depth's)."""
        if umis is None or not self.depth_cuts:
            return np.full(1 if umis is None else len(umis), self.cut)
        x = np.log(np.maximum(np.asarray(umis, np.float64), 1))
        xs = np.log([c[1] for c in self.depth_cuts])[::-1]  # increasing
        ys = np.array([c[2] for c in self.depth_cuts])[::-1]
        return np.interp(x, xs, ys)

    def map(self, query, umis=None):
        """dict of label, votes, confidence, novelty, assigned for each query row (umis: the
        depth each row is read at, in UMIs per cell, for the depth cut; None: full depth)."""
        idx, dist = knn(query, self.emb, self.k)
        pred, m = vote(self.labels[idx])
        conf = self.table[m]
        nov = dist.mean(1) / self.scale
        return {"label": pred, "votes": m, "confidence": conf, "novelty": nov,
                "assigned": (conf >= self.threshold) & (nov <= self.cut_at(umis))}

    def summary(self):
        return {"k": self.k, "cells": int(len(self.labels)),
                "table": [round(float(x), 6) for x in self.table[1:]],
                "loo_cells_per_m": np.bincount(self.loo_m, minlength=self.k + 1)[1:].tolist(),
                "loo_accuracy": float(self.loo_correct.mean()),
                "novelty_scale_p99": self.scale, "novelty_cut": self.cut,
                "depth_cuts": [list(c) for c in self.depth_cuts], "threshold": self.threshold}
