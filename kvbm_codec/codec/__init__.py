"""KVTC codec math: PCA transform, DP bit allocation, quantization, entropy coding, frame format.

Knows nothing of models, gRPC or storage: it turns a KVCache plus a calibration into bytes and back.
"""
