# Placeholder until the launch issue (#8): GPU image on NVIDIA's PyTorch container.
FROM nvcr.io/nvidia/pytorch:25.10-py3
WORKDIR /opt/megatron-autothink
COPY . .
RUN pip install --no-cache-dir "megatron-core==0.19.2" "megatron-energon[s3]==7.4.1" \
        "webdataset==1.0.2" -e .
