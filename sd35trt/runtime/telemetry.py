"""GPU telemetry around a timed region, from NVML (``nvidia-ml-py``) in a background thread.

``GpuSampler`` samples, at ``hz`` (default 20), the device's memory in use (every allocation on the GPU:
TensorRT's, onnxruntime's arena, torch's and the CUDA contexts), this process's own GPU memory, board power,
temperature and SM clock, and reads NVML's energy counter (millijoules since the driver loaded, Volta and newer)
at both ends; where the GPU has no energy counter, energy is the integral of the sampled power. Without NVML or
a GPU every column is None and ``why`` says why, so a report never shows a number nobody measured.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Telemetry:
    """One sampled region. Memory in GiB, power in W, temperature in °C, clock in MHz, energy in J."""

    seconds: float = 0.0
    samples: int = 0
    device_memory_peak_gib: float | None = None
    process_memory_peak_gib: float | None = None
    power_mean_w: float | None = None
    power_peak_w: float | None = None
    temperature_max_c: float | None = None
    sm_clock_mean_mhz: float | None = None
    energy_j: float | None = None
    energy_source: str | None = None  # "nvml counter" | "power integral"
    why: str | None = None  # set when nothing could be sampled
    gpu: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _nvml() -> tuple[Any, str | None]:
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, f"NVML is not available here ({type(exc).__name__}: no NVIDIA driver)"
    return pynvml, None


def gpu_info(index: int = 0) -> dict[str, Any]:
    """Name, driver, memory, power limit and clocks of GPU ``index`` (for reports), or {"why": ...}."""
    nvml, why = _nvml()
    if nvml is None:
        return {"why": why}
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        info: dict[str, Any] = {"name": nvml.nvmlDeviceGetName(handle), "driver": nvml.nvmlSystemGetDriverVersion(),
                                "memory_gib": round(nvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30, 2)}
        for key, call in (("power_limit_w", lambda: nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000),
                          ("sm_clock_max_mhz", lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM)),
                          ("memory_clock_max_mhz", lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_MEM))):
            try:
                info[key] = call()
            except Exception:  # noqa: BLE001 - not every GPU reports every field
                info[key] = None
        return info
    except Exception as exc:  # noqa: BLE001
        return {"why": f"NVML could not read GPU {index} ({exc})"}


class GpuSampler:
    """``with GpuSampler() as s: ...`` then ``s.result``: NVML sampled while the block runs."""

    def __init__(self, index: int = 0, hz: float = 20.0, enabled: bool = True):
        self.index, self.period, self.enabled = index, 1.0 / hz, enabled
        self.result = Telemetry()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None
        self._rows: list[tuple[float, float | None, float | None, float | None, float | None, float | None]] = []

    def __enter__(self) -> GpuSampler:
        self._start = time.perf_counter()
        if not self.enabled:
            self.result.why = "sampling off"
            return self
        self._nvml, why = _nvml()
        if self._nvml is None:
            self.result.why = why
            return self
        try:
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception as exc:  # noqa: BLE001
            self.result.why, self._nvml = f"no GPU {self.index} for NVML ({exc})", None
            return self
        self._energy0 = self._energy()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _energy(self) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)) / 1000.0  # mJ → J
        except Exception:  # noqa: BLE001 - pre-Volta GPUs have no energy counter
            return None

    def _read(self, what: str) -> float | None:
        nvml, handle = self._nvml, self._handle
        try:
            if what == "device":
                return nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30
            if what == "process":
                pid = os.getpid()
                for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid == pid and proc.usedGpuMemory is not None:
                        return proc.usedGpuMemory / 2**30
                return None
            if what == "power":
                return nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
            if what == "temperature":
                return float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            if what == "clock":
                return float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))
        except Exception:  # noqa: BLE001 - a field this GPU or container does not expose
            return None
        raise ValueError(what)

    def _run(self) -> None:
        while True:
            row = (time.perf_counter(), self._read("device"), self._read("process"), self._read("power"),
                   self._read("temperature"), self._read("clock"))
            self._rows.append(row)
            if self._stop.wait(self.period):
                return

    def __exit__(self, *exc: Any) -> bool:
        seconds = time.perf_counter() - self._start
        result = self.result
        result.seconds = seconds
        if self._thread is None:
            return False
        self._stop.set()
        self._thread.join()
        energy1 = self._energy()
        rows = self._rows
        result.samples = len(rows)

        def column(i: int) -> list[float]:
            return [r[i] for r in rows if r[i] is not None]  # type: ignore[misc]

        device, process, power, temperature, clock = (column(i) for i in range(1, 6))
        result.device_memory_peak_gib = max(device, default=None)
        result.process_memory_peak_gib = max(process, default=None)
        result.power_mean_w = sum(power) / len(power) if power else None
        result.power_peak_w = max(power, default=None)
        result.temperature_max_c = max(temperature, default=None)
        result.sm_clock_mean_mhz = sum(clock) / len(clock) if clock else None
        if self._energy0 is not None and energy1 is not None:
            result.energy_j, result.energy_source = energy1 - self._energy0, "nvml counter"
        elif len(power) > 1:
            stamps = [r[0] for r in rows if r[3] is not None]
            result.energy_j = sum((t1 - t0) * (p0 + p1) / 2 for t0, t1, p0, p1 in
                                  zip(stamps, stamps[1:], power, power[1:]))
            result.energy_source = "power integral"
        return False
