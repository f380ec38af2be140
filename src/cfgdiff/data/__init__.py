"""Datasets: where they come from (sources, folders), what cfgdiff knows of each (specs), their
caches (store, folder_cache) and training batches (batches). This module only re-exports.
"""

from cfgdiff.data.folder_cache import load_folder
from cfgdiff.data.specs import (
    DATASETS,
    DatasetName,
    DatasetSpec,
    canonical_name,
    check_name,
    is_folder,
)
from cfgdiff.data.store import (
    Dataset,
    class_names_of,
    convert_images,
    default_data_dir,
    info,
    load_dataset,
    obtain,
)

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetName",
    "DatasetSpec",
    "canonical_name",
    "check_name",
    "class_names_of",
    "convert_images",
    "default_data_dir",
    "info",
    "is_folder",
    "load_dataset",
    "load_folder",
    "obtain",
]
