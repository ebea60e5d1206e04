"""Data sources: Fashion-MNIST's IDX files, folders of images, .npz arrays and Hugging Face datasets on
disk, decoded once into uint8 tensors.

``readers`` decodes files; ``sources`` is the table of named sources that training and
evaluation share (``load_dataset``, ``class_names``, the reference images of an evaluation).
"""
from .readers import (FASHION_MNIST_CLASSES, Batches, Labeled, find_fashion_mnist, from_model_range,
                      load_fashion_mnist, load_fashion_mnist_labels, load_image, load_image_folder,
                      random_hflip, read_idx, to_model_range)
from .sources import (KINDS, SOURCES, DataSource, SourceInfo, class_names, describe, load_dataset,
                      load_labeled_dataset, named_source, reference_images)

__all__ = ["FASHION_MNIST_CLASSES", "KINDS", "SOURCES", "Batches", "DataSource", "Labeled", "SourceInfo",
           "class_names", "describe",
           "find_fashion_mnist", "from_model_range", "load_dataset", "load_fashion_mnist",
           "load_fashion_mnist_labels", "load_image", "load_image_folder", "load_labeled_dataset",
           "named_source", "random_hflip", "read_idx", "reference_images", "to_model_range"]
