"""Deterministic audio synthesis and feature extraction for the analyze_tracks demo."""

from __future__ import annotations

import hashlib

import numpy as np

RATE = 22_050
SECONDS = 6.0
HOP = 512


def synthesize(track: str) -> tuple[np.ndarray, float]:
    """A few seconds of music-like audio fixed by the track id: a drum pulse at a tempo
    between 70 and 170 BPM over a chord and noise. Returns (samples, true tempo)."""
    seed = int.from_bytes(hashlib.sha256(track.encode()).digest()[:8], "big")
    rng = np.random.default_rng(seed)
    bpm = float(rng.uniform(70, 170))
    t = np.arange(int(RATE * SECONDS)) / RATE
    chord = sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(110, 880, size=3)) / 3
    beat = (t % (60.0 / bpm)) < 0.03
    drum = beat * np.sin(2 * np.pi * 60 * t) * 2.0
    gain = float(rng.uniform(0.05, 0.5))
    signal = gain * (0.4 * chord + drum + 0.05 * rng.standard_normal(t.size))
    return signal.astype(np.float32), bpm


def tempo(signal: np.ndarray) -> float:
    """BPM from the autocorrelation of the onset-strength envelope."""
    frames = signal[: signal.size // HOP * HOP].reshape(-1, HOP)
    energy = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))
    onset = np.maximum(np.diff(energy), 0)
    onset -= onset.mean()
    ac = np.correlate(onset, onset, mode="full")[onset.size - 1:]
    fps = RATE / HOP
    lo, hi = int(fps * 60 / 180), int(fps * 60 / 60)  # lags for 180 down to 60 BPM
    lag = lo + int(np.argmax(ac[lo:hi]))
    return round(60.0 * fps / lag, 1)


def features(track: str) -> dict[str, float]:
    signal, _ = synthesize(track)
    rms = float(np.sqrt(np.mean(signal.astype(np.float64) ** 2)))
    crossings = np.count_nonzero(np.diff(np.signbit(signal)))
    return {
        "loudness_db": round(20 * float(np.log10(max(rms, 1e-12))), 2),
        "zero_crossing_rate": round(int(crossings) / signal.size, 5),
        "tempo_bpm": tempo(signal),
    }
