mod qwen2_vl;
