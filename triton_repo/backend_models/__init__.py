"""Python-backend model files, copied as `<model>/1/model.py` by the generator.

They run inside Triton's python backend (server environment: numpy < 2, pillow, onnxruntime) and
import `triton_python_backend_utils`, so the project never imports them; tests serve them.
"""
