"""Datasets: one record type, readers for the common anomaly-detection layouts, the built-in benchmark.

The benchmark generator lives in `vlmdiff.data.demo` (imported on demand: it needs OpenCV and
scikit-image).
"""
from vlmdiff.data.coco_ad import read_coco_ad
from vlmdiff.data.folder import read_folder
from vlmdiff.data.mvtec import read_mvtec
from vlmdiff.data.readers import LAYOUTS, DatasetLayout, detect_layout, read_dataset, register_layout
from vlmdiff.data.realiad import read_realiad
from vlmdiff.data.records import NORMAL_DEFECT, ImageRecord
from vlmdiff.data.visa import read_visa

__all__ = [
    "ImageRecord", "NORMAL_DEFECT", "DatasetLayout", "LAYOUTS", "register_layout", "detect_layout",
    "read_dataset", "read_mvtec", "read_visa", "read_realiad", "read_coco_ad", "read_folder",
]
