"""Which TensorRT API the engine code is type-checked against.

``backends.py`` and ``runners.py`` take their ``tensorrt`` module at run time (TensorRT or TensorRT-RTX, chosen
per bundle). Under ``TYPE_CHECKING`` they import the stubs of ``typings/`` instead (the real TensorRT 11.4 and
TensorRT-RTX 1.7 bindings, generated with pybind11-stubgen), so a checker verifies every builder and runtime
call: ``make lint`` runs mypy once as it is (TensorRT 11.4) and once with ``--always-true CHECK_RTX``.
"""

CHECK_RTX = False
