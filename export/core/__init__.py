"""The contract every stage shares: errors, names, the export folder, preprocessing,
images, metrics, progress. Nothing heavy at import time; imports nothing else of export.
"""
