"""Data every part of mordasr uses: the photographs shipped with scikit-image (``samples``), HR
photographs and LR/HR pairs from folders (``folders``), and the degradations that make LR inputs
from HR photographs (``degradations``: blur, noise, JPEG with known parameters; ``realesrgan``:
Real-ESRGAN's second-order chain). Training, export (bucket placement), calibration, evaluation and
the demo all take their data from here."""
