"""Datasets as grain random-access sources: CIFAR-10, list files, image folders, digits."""
