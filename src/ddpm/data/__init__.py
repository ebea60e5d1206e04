"""Data sources: Fashion-MNIST's IDX files and folders of images, decoded once into uint8 tensors."""
from .readers import (FASHION_MNIST_CLASSES, Batches, Labeled, class_names, find_fashion_mnist, from_model_range,
                      load_dataset, load_labeled_dataset,
                      load_fashion_mnist, load_fashion_mnist_labels, load_image, load_image_folder,
                      random_hflip, read_idx, to_model_range)

__all__ = ["FASHION_MNIST_CLASSES", "Batches", "Labeled", "class_names", "load_labeled_dataset", "find_fashion_mnist", "from_model_range", "load_dataset",
           "load_fashion_mnist", "load_fashion_mnist_labels", "load_image", "load_image_folder",
           "random_hflip", "read_idx", "to_model_range"]
