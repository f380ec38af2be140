"""Pictures: image grids, animations and sample files with Pillow (images.py), and plots with
matplotlib (plots.py). Import from the modules."""
