
using namespace System.Management.Automation
using namespace System.Management.Automation.Language

Register-ArgumentCompleter -Native -CommandName 'mmllm' -ScriptBlock {
    param($wordToComplete, $commandAst, $cursorPosition)

    $commandElements = $commandAst.CommandElements
    $command = @(
        'mmllm'
        for ($i = 1; $i -lt $commandElements.Count; $i++) {
            $element = $commandElements[$i]
            if ($element -isnot [StringConstantExpressionAst] -or
                $element.StringConstantType -ne [StringConstantType]::BareWord -or
                $element.Value.StartsWith('-') -or
                $element.Value -eq $wordToComplete) {
                break
        }
        $element.Value
    }) -join ';'

    $completions = @(switch ($command) {
        'mmllm' {
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('image', 'image', [CompletionResultType]::ParameterValue, 'Prompt a model with one or more images')
            [CompletionResult]::new('video', 'video', [CompletionResultType]::ParameterValue, 'Prompt a model with a video file or a directory of frames')
            [CompletionResult]::new('audio', 'audio', [CompletionResultType]::ParameterValue, 'Prompt a model with audio (WAV, mp3, flac, ogg, m4a, .npy)')
            [CompletionResult]::new('embeds', 'embeds', [CompletionResultType]::ParameterValue, 'Prompt a model with precomputed embeddings instead of raw media')
            [CompletionResult]::new('batch', 'batch', [CompletionResultType]::ParameterValue, 'Run a YAML (or JSONL) manifest of jobs, writing one JSONL result per job')
            [CompletionResult]::new('merge', 'merge', [CompletionResultType]::ParameterValue, 'Join the outputs of sharded batch runs into one JSONL file, in manifest order')
            [CompletionResult]::new('serve', 'serve', [CompletionResultType]::ParameterValue, 'Serve the model over HTTP with the OpenAI Chat Completions API (POST /v1/chat/completions, GET /v1/models, /health, /metrics); concurrent requests share one continuous batch. SIGTERM stops new requests and lets in-flight ones finish')
            [CompletionResult]::new('profile-decode', 'profile-decode', [CompletionResultType]::ParameterValue, 'Time single-token decode steps of a model (for bench/gpu.py): step wall time, host time to enqueue a step and GPU time to run it. Prints a JSON line')
            [CompletionResult]::new('profile-preprocess', 'profile-preprocess', [CompletionResultType]::ParameterValue, 'Time decoding an image file and one image processor on it (for bench/cpu.py): the best of `--runs` runs of each. Prints a JSON line; `--dump` writes the pixel values as .npy')
            [CompletionResult]::new('generate-docs', 'generate-docs', [CompletionResultType]::ParameterValue, 'Write the man pages and shell completions (for packagers)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'mmllm;image' {
            [CompletionResult]::new('-p', '-p', [CompletionResultType]::ParameterName, 'The prompt text (then every positional argument is a media item); - reads stdin')
            [CompletionResult]::new('--prompt', '--prompt', [CompletionResultType]::ParameterName, 'The prompt text (then every positional argument is a media item); - reads stdin')
            [CompletionResult]::new('--system', '--system', [CompletionResultType]::ParameterName, 'System prompt, added as a system turn of the chat template')
            [CompletionResult]::new('--chat-template', '--chat-template', [CompletionResultType]::ParameterName, 'Jinja chat template file overriding the model''s')
            [CompletionResult]::new('--limit-mm-per-prompt', '--limit-mm-per-prompt', [CompletionResultType]::ParameterName, 'Maximum media items per prompt, e.g. image=2,video=1,audio=1 (default: the model''s)')
            [CompletionResult]::new('-m', '-m', [CompletionResultType]::ParameterName, 'Model: an alias (llava, qwen2-vl, ...), a Hugging Face repo id, or a local directory')
            [CompletionResult]::new('--model', '--model', [CompletionResultType]::ParameterName, 'Model: an alias (llava, qwen2-vl, ...), a Hugging Face repo id, or a local directory')
            [CompletionResult]::new('-o', '-o', [CompletionResultType]::ParameterName, 'Output format: text streams tokens to stdout; jsonl prints one JSON object per prompt')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format: text streams tokens to stdout; jsonl prints one JSON object per prompt')
            [CompletionResult]::new('--max-tokens', '--max-tokens', [CompletionResultType]::ParameterName, 'Maximum number of tokens to generate [default: 256]')
            [CompletionResult]::new('--temperature', '--temperature', [CompletionResultType]::ParameterName, 'Sampling temperature; 0 is greedy decoding [default: 0]')
            [CompletionResult]::new('--top-p', '--top-p', [CompletionResultType]::ParameterName, 'Nucleus sampling: keep the smallest set of tokens whose probability reaches P')
            [CompletionResult]::new('--top-k', '--top-k', [CompletionResultType]::ParameterName, 'Keep only the K most likely tokens when sampling')
            [CompletionResult]::new('--repetition-penalty', '--repetition-penalty', [CompletionResultType]::ParameterName, 'Penalise tokens already in the prompt or output (1.0 = off), as Hugging Face does')
            [CompletionResult]::new('--seed', '--seed', [CompletionResultType]::ParameterName, 'Random seed for sampling [default: 0]')
            [CompletionResult]::new('--stop', '--stop', [CompletionResultType]::ParameterName, 'Stop generating when this text appears (repeatable); it is not printed')
            [CompletionResult]::new('--logprobs', '--logprobs', [CompletionResultType]::ParameterName, 'Also report the N most likely tokens and their log-probabilities at each step (jsonl)')
            [CompletionResult]::new('--device', '--device', [CompletionResultType]::ParameterName, 'Device: auto, cpu, cuda or cuda:N')
            [CompletionResult]::new('--dtype', '--dtype', [CompletionResultType]::ParameterName, 'Weights dtype: auto (bf16 on CUDA, f32 on CPU), bf16, f16 or f32')
            [CompletionResult]::new('--id', '--id', [CompletionResultType]::ParameterName, 'Id reported in jsonl output')
            [CompletionResult]::new('--min-pixels', '--min-pixels', [CompletionResultType]::ParameterName, 'Minimum pixels per image or video frame after resizing (models that resize by pixel budget, e.g. Qwen2-VL; default: the model''s processor config)')
            [CompletionResult]::new('--max-pixels', '--max-pixels', [CompletionResultType]::ParameterName, 'Maximum pixels per image or video frame after resizing (models that resize by pixel budget, e.g. Qwen2-VL; default: the model''s processor config)')
            [CompletionResult]::new('--max-slice-nums', '--max-slice-nums', [CompletionResultType]::ParameterName, 'The most slices one high-resolution image is cut into (MiniCPM-V''s processor kwarg `max_slice_nums`; default: the model''s processor config)')
            [CompletionResult]::new('--num-crops', '--num-crops', [CompletionResultType]::ParameterName, 'Most 336-pixel crops an image is tiled into (models that tile images into a grid of crops, e.g. Phi-3-vision; default: the model''s processor config)')
            [CompletionResult]::new('--raw', '--raw', [CompletionResultType]::ParameterName, 'Send the prompt verbatim, without the chat template; it must contain one placeholder (e.g. <image>) per media item')
            [CompletionResult]::new('--ignore-eos', '--ignore-eos', [CompletionResultType]::ParameterName, 'Keep generating past the end-of-sequence token (for benchmarks)')
            [CompletionResult]::new('--dry-run', '--dry-run', [CompletionResultType]::ParameterName, 'Decode the inputs and print the validated plan as JSON without loading weights')
            [CompletionResult]::new('--allow-private-media-urls', '--allow-private-media-urls', [CompletionResultType]::ParameterName, 'Allow media URLs on loopback, private, link-local and cloud-metadata addresses (refused by default, as a server must)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'mmllm;video' {
            [CompletionResult]::new('-p', '-p', [CompletionResultType]::ParameterName, 'The prompt text (then every positional argument is a media item); - reads stdin')
            [CompletionResult]::new('--prompt', '--prompt', [CompletionResultType]::ParameterName, 'The prompt text (then every positional argument is a media item); - reads stdin')
            [CompletionResult]::new('--system', '--system', [CompletionResultType]::ParameterName, 'System prompt, added as a system turn of the chat template')
            [CompletionResult]::new('--chat-template', '--chat-template', [CompletionResultType]::ParameterName, 'Jinja chat template file overriding the model''s')
            [CompletionResult]::new('--limit-mm-per-prompt', '--limit-mm-per-prompt', [CompletionResultType]::ParameterName, 'Maximum media items per prompt, e.g. image=2,video=1,audio=1 (default: the model''s)')
            [CompletionResult]::new('-m', '-m', [CompletionResultType]::ParameterName, 'Model: an alias (llava, qwen2-vl, ...), a Hugging Face repo id, or a local directory')
            [CompletionResult]::new('--model', '--model', [CompletionResultType]::ParameterName, 'Model: an alias (llava, qwen2-vl, ...), a Hugging Face repo id, or a local directory')
            [CompletionResult]::new('-o', '-o', [CompletionResultType]::ParameterName, 'Output format: text streams tokens to stdout; jsonl prints one JSON object per prompt')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format: text streams tokens to stdout; jsonl prints one JSON object per prompt')
            [CompletionResult]::new('--max-tokens', '--max-tokens', [CompletionResultType]::ParameterName, 'Maximum number of tokens to generate [default: 256]')
            [CompletionResult]::new('--temperature', '--temperature', [CompletionResultType]::ParameterName, 'Sampling temperature; 0 is greedy decoding [default: 0]')
            [CompletionResult]::new('--top-p', '--top-p', [CompletionResultType]::ParameterName, 'Nucleus sampling: keep the smallest set of tokens whose probability reaches P')
            [CompletionResult]::new('--top-k', '--top-k', [CompletionResultType]::ParameterName, 'Keep only the K most likely tokens when sampling')
            [CompletionResult]::new('--repetition-penalty', '--repetition-penalty', [CompletionResultType]::ParameterName, 'Penalise tokens already in the prompt or output (1.0 = off), as Hugging Face does')
            [CompletionResult]::new('--seed', '--seed', [CompletionResultType]::ParameterName, 'Random seed for sampling [default: 0]')
            [CompletionResult]::new('--stop', '--stop', [CompletionResultType]::ParameterName, 'Stop generating when this text appears (repeatable); it is not printed')
            [CompletionResult]::new('--logprobs', '--logprobs', [CompletionResultType]::ParameterName, 'Also report the N most likely tokens and their log-probabilities at each step (jsonl)')
            [CompletionResult]::new('--device', '--device', [CompletionResultType]::ParameterName, 'Device: auto, cpu, cuda or cuda:N')
            [CompletionResult]::new('--dtype', '--dtype', [CompletionResultType]::ParameterName, 'Weights dtype: auto (bf16 on CUDA, f32 on CPU), bf16, f16 or f32')
            [CompletionResult]::new('--id', '--id', [CompletionResultType]::ParameterName, 'Id reported in jsonl output')
            [CompletionResult]::new('--min-pixels', '--min-pixels', [CompletionResultType]::ParameterName, 'Minimum pixels per image or video frame after resizing (models that resize by pixel budget, e.g. Qwen2-VL; default: the model''s processor config)')
            [CompletionResult]::new('--max-pixels', '--max-pixels', [CompletionResultType]::ParameterName, 'Maximum pixels per image or video frame after resizing (models that resize by pixel budget, e.g. Qwen2-VL; default: the model''s processor config)')
            [CompletionResult]::new('--max-slice-nums', '--max-slice-nums', [CompletionResultType]::ParameterName, 'The most slices one high-resolution image is cut into (MiniCPM-V''s processor kwarg `max_slice_nums`; default: the model''s processor config)')
            [CompletionResult]::new('--num-crops', '--num-crops', [CompletionResultType]::ParameterName, 'Most 336-pixel crops an image is tiled into (models that tile images into a grid of crops, e.g. Phi-3-vision; default: the model''s processor config)')
            [CompletionResult]::new('--num-frames', '--num-frames', [CompletionResultType]::ParameterName, 'Sample N frames uniformly over the whole video')
            [CompletionResult]::new('--fps', '--fps', [CompletionResultType]::ParameterName, 'Sample frames at F frames per second')
            [CompletionResult]::new('--raw', '--raw', [CompletionResultType]::ParameterName, 'Send the prompt verbatim, without the chat template; it must contain one placeholder (e.g. <image>) per media item')
            [CompletionResult]::new('--ignore-eos', '--ignore-eos', [CompletionResultType]::ParameterName, 'Keep generating past the end-of-sequence token (for benchmarks)')
            [CompletionResult]::new('--dry-run', '--dry-run', [CompletionResultType]::ParameterName, 'Decode the inputs and print the validated plan as JSON without loading weights')
            [CompletionResult]::new('--allow-private-media-urls', '--allow-private-media-urls', [CompletionResultType]::ParameterName, 'Allow media URLs on loopback, private, link-local and cloud-metadata addresses (refused by default, as a server must)')
            [CompletionResult]::new('--as-images', '--as-images', [CompletionResultType]::ParameterName, 'Send the sampled frames as a multi-image prompt (counted against the image limit)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'mmllm;audio' {
            [CompletionResult]::new('-p', '-p', [CompletionResultType]::ParameterName, 'The prompt text (then every positional argument is a media item); - reads stdin')
            [CompletionResult]::new('--prompt', '--prompt', [CompletionResultType]::ParameterName, 'The prompt text (then every positional argument is a media item); - reads stdin')
            [CompletionResult]::new('--system', '--system', [CompletionResultType]::ParameterName, 'System prompt, added as a system turn of the chat template')
            [CompletionResult]::new('--chat-template', '--chat-template', [CompletionResultType]::ParameterName, 'Jinja chat template file overriding the model''s')
            [CompletionResult]::new('--limit-mm-per-prompt', '--limit-mm-per-prompt', [CompletionResultType]::ParameterName, 'Maximum media items per prompt, e.g. image=2,video=1,audio=1 (default: the model''s)')
            [CompletionResult]::new('-m', '-m', [CompletionResultType]::ParameterName, 'Model: an alias (llava, qwen2-vl, ...), a Hugging Face repo id, or a local directory')
            [CompletionResult]::new('--model', '--model', [CompletionResultType]::ParameterName, 'Model: an alias (llava, qwen2-vl, ...), a Hugging Face repo id, or a local directory')
            [CompletionResult]::new('-o', '-o', [CompletionResultType]::ParameterName, 'Output format: text streams tokens to stdout; jsonl prints one JSON object per prompt')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format: text streams tokens to stdout; jsonl prints one JSON object per prompt')
            [CompletionResult]::new('--max-tokens', '--max-tokens', [CompletionResultType]::ParameterName, 'Maximum number of tokens to generate [default: 256]')
            [CompletionResult]::new('--temperature', '--temperature', [CompletionResultType]::ParameterName, 'Sampling temperature; 0 is greedy decoding [default: 0]')
            [CompletionResult]::new('--top-p', '--top-p', [CompletionResultType]::ParameterName, 'Nucleus sampling: keep the smallest set of tokens whose probability reaches P')
            [CompletionResult]::new('--top-k', '--top-k', [CompletionResultType]::ParameterName, 'Keep only the K most likely tokens when sampling')
            [CompletionResult]::new('--repetition-penalty', '--repetition-penalty', [CompletionResultType]::ParameterName, 'Penalise tokens already in the prompt or output (1.0 = off), as Hugging Face does')
            [CompletionResult]::new('--seed', '--seed', [CompletionResultType]::ParameterName, 'Random seed for sampling [default: 0]')
            [CompletionResult]::new('--stop', '--stop', [CompletionResultType]::ParameterName, 'Stop generating when this text appears (repeatable); it is not printed')
            [CompletionResult]::new('--logprobs', '--logprobs', [CompletionResultType]::ParameterName, 'Also report the N most likely tokens and their log-probabilities at each step (jsonl)')
            [CompletionResult]::new('--device', '--device', [CompletionResultType]::ParameterName, 'Device: auto, cpu, cuda or cuda:N')
            [CompletionResult]::new('--dtype', '--dtype', [CompletionResultType]::ParameterName, 'Weights dtype: auto (bf16 on CUDA, f32 on CPU), bf16, f16 or f32')
            [CompletionResult]::new('--id', '--id', [CompletionResultType]::ParameterName, 'Id reported in jsonl output')
            [CompletionResult]::new('--sample-rate', '--sample-rate', [CompletionResultType]::ParameterName, 'Sample rate of .npy inputs (raw float arrays carry none)')
            [CompletionResult]::new('--raw', '--raw', [CompletionResultType]::ParameterName, 'Send the prompt verbatim, without the chat template; it must contain one placeholder (e.g. <image>) per media item')
            [CompletionResult]::new('--ignore-eos', '--ignore-eos', [CompletionResultType]::ParameterName, 'Keep generating past the end-of-sequence token (for benchmarks)')
            [CompletionResult]::new('--dry-run', '--dry-run', [CompletionResultType]::ParameterName, 'Decode the inputs and print the validated plan as JSON without loading weights')
            [CompletionResult]::new('--allow-private-media-urls', '--allow-private-media-urls', [CompletionResultType]::ParameterName, 'Allow media URLs on loopback, private, link-local and cloud-metadata addresses (refused by default, as a server must)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'mmllm;embeds' {
            [CompletionResult]::new('-p', '-p', [CompletionResultType]::ParameterName, 'The prompt text (then every positional argument is a media item); - reads stdin')
            [CompletionResult]::new('--prompt', '--prompt', [CompletionResultType]::ParameterName, 'The prompt text (then every positional argument is a media item); - reads stdin')
            [CompletionResult]::new('--system', '--system', [CompletionResultType]::ParameterName, 'System prompt, added as a system turn of the chat template')
            [CompletionResult]::new('--chat-template', '--chat-template', [CompletionResultType]::ParameterName, 'Jinja chat template file overriding the model''s')
            [CompletionResult]::new('--limit-mm-per-prompt', '--limit-mm-per-prompt', [CompletionResultType]::ParameterName, 'Maximum media items per prompt, e.g. image=2,video=1,audio=1 (default: the model''s)')
            [CompletionResult]::new('-m', '-m', [CompletionResultType]::ParameterName, 'Model: an alias (llava, qwen2-vl, ...), a Hugging Face repo id, or a local directory')
            [CompletionResult]::new('--model', '--model', [CompletionResultType]::ParameterName, 'Model: an alias (llava, qwen2-vl, ...), a Hugging Face repo id, or a local directory')
            [CompletionResult]::new('-o', '-o', [CompletionResultType]::ParameterName, 'Output format: text streams tokens to stdout; jsonl prints one JSON object per prompt')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format: text streams tokens to stdout; jsonl prints one JSON object per prompt')
            [CompletionResult]::new('--max-tokens', '--max-tokens', [CompletionResultType]::ParameterName, 'Maximum number of tokens to generate [default: 256]')
            [CompletionResult]::new('--temperature', '--temperature', [CompletionResultType]::ParameterName, 'Sampling temperature; 0 is greedy decoding [default: 0]')
            [CompletionResult]::new('--top-p', '--top-p', [CompletionResultType]::ParameterName, 'Nucleus sampling: keep the smallest set of tokens whose probability reaches P')
            [CompletionResult]::new('--top-k', '--top-k', [CompletionResultType]::ParameterName, 'Keep only the K most likely tokens when sampling')
            [CompletionResult]::new('--repetition-penalty', '--repetition-penalty', [CompletionResultType]::ParameterName, 'Penalise tokens already in the prompt or output (1.0 = off), as Hugging Face does')
            [CompletionResult]::new('--seed', '--seed', [CompletionResultType]::ParameterName, 'Random seed for sampling [default: 0]')
            [CompletionResult]::new('--stop', '--stop', [CompletionResultType]::ParameterName, 'Stop generating when this text appears (repeatable); it is not printed')
            [CompletionResult]::new('--logprobs', '--logprobs', [CompletionResultType]::ParameterName, 'Also report the N most likely tokens and their log-probabilities at each step (jsonl)')
            [CompletionResult]::new('--device', '--device', [CompletionResultType]::ParameterName, 'Device: auto, cpu, cuda or cuda:N')
            [CompletionResult]::new('--dtype', '--dtype', [CompletionResultType]::ParameterName, 'Weights dtype: auto (bf16 on CUDA, f32 on CPU), bf16, f16 or f32')
            [CompletionResult]::new('--id', '--id', [CompletionResultType]::ParameterName, 'Id reported in jsonl output')
            [CompletionResult]::new('--modality', '--modality', [CompletionResultType]::ParameterName, 'Which modality the embeddings stand for')
            [CompletionResult]::new('--image-grid-thw', '--image-grid-thw', [CompletionResultType]::ParameterName, 'image_grid_thw tensor (num_items, 3) for Qwen2-VL, when not in the embeds file')
            [CompletionResult]::new('--image-sizes', '--image-sizes', [CompletionResultType]::ParameterName, 'image_sizes tensor for MiniCPM-V, when not in the embeds file')
            [CompletionResult]::new('--raw', '--raw', [CompletionResultType]::ParameterName, 'Send the prompt verbatim, without the chat template; it must contain one placeholder (e.g. <image>) per media item')
            [CompletionResult]::new('--ignore-eos', '--ignore-eos', [CompletionResultType]::ParameterName, 'Keep generating past the end-of-sequence token (for benchmarks)')
            [CompletionResult]::new('--dry-run', '--dry-run', [CompletionResultType]::ParameterName, 'Decode the inputs and print the validated plan as JSON without loading weights')
            [CompletionResult]::new('--allow-private-media-urls', '--allow-private-media-urls', [CompletionResultType]::ParameterName, 'Allow media URLs on loopback, private, link-local and cloud-metadata addresses (refused by default, as a server must)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'mmllm;batch' {
            [CompletionResult]::new('-o', '-o', [CompletionResultType]::ParameterName, 'Write results here (JSONL) instead of stdout; {shard} in the path becomes the shard, K-of-N with K zero-padded (out-{shard}.jsonl: out-03-of-12.jsonl)')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Write results here (JSONL) instead of stdout; {shard} in the path becomes the shard, K-of-N with K zero-padded (out-{shard}.jsonl: out-03-of-12.jsonl)')
            [CompletionResult]::new('--shard', '--shard', [CompletionResultType]::ParameterName, 'Run only shard K of N (0-based): the jobs whose id hashes to K (FNV-1a 64 of the id, mod N). The whole manifest is still validated. Overrides the environment')
            [CompletionResult]::new('--shards', '--shards', [CompletionResultType]::ParameterName, 'Number of shards when the shard index comes from the environment: Kubernetes'' JOB_COMPLETION_INDEX, or a Slurm task whose SLURM_ARRAY_TASK_ID is then the index itself (to rerun some tasks: --array=3,7). Also MMLLM_SHARDS=N. Without --shard or --shards, a Slurm array task takes shard ID-MIN of SLURM_ARRAY_TASK_COUNT')
            [CompletionResult]::new('--media-root', '--media-root', [CompletionResultType]::ParameterName, 'Confine the manifest''s local files (media, embeds, extra tensors, chat templates) to DIR: each path is resolved (`..` and symlinks followed) and must lie inside it. For manifests from an untrusted source; model folders and URLs are not affected')
            [CompletionResult]::new('--max-seqs', '--max-seqs', [CompletionResultType]::ParameterName, 'Most sequences of one model generated at once (continuous batching)')
            [CompletionResult]::new('--device', '--device', [CompletionResultType]::ParameterName, 'Device: auto, cpu, cuda or cuda:N')
            [CompletionResult]::new('--dtype', '--dtype', [CompletionResultType]::ParameterName, 'Weights dtype: auto (bf16 on CUDA, f32 on CPU), bf16, f16 or f32')
            [CompletionResult]::new('--strict', '--strict', [CompletionResultType]::ParameterName, 'Check every job''s media before running any, and fail listing all problems')
            [CompletionResult]::new('--resume', '--resume', [CompletionResultType]::ParameterName, 'Skip jobs whose id already has a result in the output file, and append')
            [CompletionResult]::new('--unordered', '--unordered', [CompletionResultType]::ParameterName, 'Write results in completion order instead of manifest order')
            [CompletionResult]::new('--allow-private-media-urls', '--allow-private-media-urls', [CompletionResultType]::ParameterName, 'Allow media URLs on loopback, private, link-local and cloud-metadata addresses')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'mmllm;merge' {
            [CompletionResult]::new('-o', '-o', [CompletionResultType]::ParameterName, 'Write the merged JSONL here instead of stdout')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Write the merged JSONL here instead of stdout')
            [CompletionResult]::new('--manifest', '--manifest', [CompletionResultType]::ParameterName, 'The manifest the runs came from: lines follow its order, and jobs with no result (missing, or only error lines) are listed with exit status 1. Without it, ids keep the order in which the inputs first name them')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'mmllm;serve' {
            [CompletionResult]::new('-m', '-m', [CompletionResultType]::ParameterName, 'Model: an alias (llava, qwen2-vl, ...), a Hugging Face repo id, or a local directory. Requests must name it as their `model`')
            [CompletionResult]::new('--model', '--model', [CompletionResultType]::ParameterName, 'Model: an alias (llava, qwen2-vl, ...), a Hugging Face repo id, or a local directory. Requests must name it as their `model`')
            [CompletionResult]::new('--host', '--host', [CompletionResultType]::ParameterName, 'Address to listen on')
            [CompletionResult]::new('--port', '--port', [CompletionResultType]::ParameterName, 'Port to listen on (0: any free port; the address is printed on stderr)')
            [CompletionResult]::new('--api-key', '--api-key', [CompletionResultType]::ParameterName, 'Require `Authorization: Bearer KEY` on /v1 requests')
            [CompletionResult]::new('--allowed-local-media-path', '--allowed-local-media-path', [CompletionResultType]::ParameterName, 'Serve file:// media URLs below this directory (after resolving .. and links); without it file:// URLs are refused')
            [CompletionResult]::new('--allowed-media-domains', '--allowed-media-domains', [CompletionResultType]::ParameterName, 'Fetch media URLs only from these hosts (comma-separated, exact host names)')
            [CompletionResult]::new('--limit-mm-per-prompt', '--limit-mm-per-prompt', [CompletionResultType]::ParameterName, 'Maximum media items per prompt, e.g. image=2,video=1,audio=1 (default: the model''s)')
            [CompletionResult]::new('--max-seqs', '--max-seqs', [CompletionResultType]::ParameterName, 'Most sequences generated at once (continuous batching)')
            [CompletionResult]::new('--max-waiting', '--max-waiting', [CompletionResultType]::ParameterName, 'Requests queued beyond --max-seqs before new ones get 429 with Retry-After')
            [CompletionResult]::new('--max-request-bytes', '--max-request-bytes', [CompletionResultType]::ParameterName, 'Largest request body in bytes (base64 media included); larger ones get 413')
            [CompletionResult]::new('--shutdown-grace', '--shutdown-grace', [CompletionResultType]::ParameterName, 'Seconds in-flight requests may take to finish after SIGTERM')
            [CompletionResult]::new('--device', '--device', [CompletionResultType]::ParameterName, 'Device: auto, cpu, cuda or cuda:N')
            [CompletionResult]::new('--dtype', '--dtype', [CompletionResultType]::ParameterName, 'Weights dtype: auto (bf16 on CUDA, f32 on CPU), bf16, f16 or f32')
            [CompletionResult]::new('--allow-private-media-urls', '--allow-private-media-urls', [CompletionResultType]::ParameterName, 'Allow media URLs on loopback, private, link-local and cloud-metadata addresses')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'mmllm;profile-decode' {
            [CompletionResult]::new('--model', '--model', [CompletionResultType]::ParameterName, 'model')
            [CompletionResult]::new('--device', '--device', [CompletionResultType]::ParameterName, 'device')
            [CompletionResult]::new('--dtype', '--dtype', [CompletionResultType]::ParameterName, 'dtype')
            [CompletionResult]::new('--context', '--context', [CompletionResultType]::ParameterName, 'Prompt length (token ids 1..) prefilled before the timed steps')
            [CompletionResult]::new('--steps', '--steps', [CompletionResultType]::ParameterName, 'Decode steps timed (after 8 untimed ones)')
            [CompletionResult]::new('--image', '--image', [CompletionResultType]::ParameterName, 'Also time encoding this image (preprocessing and vision tower)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'mmllm;profile-preprocess' {
            [CompletionResult]::new('--processor', '--processor', [CompletionResultType]::ParameterName, 'Which processor: transformers'' slow `CLIPImageProcessor` or `Qwen2VLImageProcessor`')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'A `preprocessor_config.json` (default: the processor''s transformers defaults)')
            [CompletionResult]::new('--runs', '--runs', [CompletionResultType]::ParameterName, 'Timed runs of decode and of preprocessing (after one untimed run)')
            [CompletionResult]::new('--dump', '--dump', [CompletionResultType]::ParameterName, 'Write the `pixel_values` (f32, the processor''s output shape) to this .npy file')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'mmllm;generate-docs' {
            [CompletionResult]::new('--out-dir', '--out-dir', [CompletionResultType]::ParameterName, 'Directory under which `man/` and `completions/` are written')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'mmllm;help' {
            [CompletionResult]::new('image', 'image', [CompletionResultType]::ParameterValue, 'Prompt a model with one or more images')
            [CompletionResult]::new('video', 'video', [CompletionResultType]::ParameterValue, 'Prompt a model with a video file or a directory of frames')
            [CompletionResult]::new('audio', 'audio', [CompletionResultType]::ParameterValue, 'Prompt a model with audio (WAV, mp3, flac, ogg, m4a, .npy)')
            [CompletionResult]::new('embeds', 'embeds', [CompletionResultType]::ParameterValue, 'Prompt a model with precomputed embeddings instead of raw media')
            [CompletionResult]::new('batch', 'batch', [CompletionResultType]::ParameterValue, 'Run a YAML (or JSONL) manifest of jobs, writing one JSONL result per job')
            [CompletionResult]::new('merge', 'merge', [CompletionResultType]::ParameterValue, 'Join the outputs of sharded batch runs into one JSONL file, in manifest order')
            [CompletionResult]::new('serve', 'serve', [CompletionResultType]::ParameterValue, 'Serve the model over HTTP with the OpenAI Chat Completions API (POST /v1/chat/completions, GET /v1/models, /health, /metrics); concurrent requests share one continuous batch. SIGTERM stops new requests and lets in-flight ones finish')
            [CompletionResult]::new('profile-decode', 'profile-decode', [CompletionResultType]::ParameterValue, 'Time single-token decode steps of a model (for bench/gpu.py): step wall time, host time to enqueue a step and GPU time to run it. Prints a JSON line')
            [CompletionResult]::new('profile-preprocess', 'profile-preprocess', [CompletionResultType]::ParameterValue, 'Time decoding an image file and one image processor on it (for bench/cpu.py): the best of `--runs` runs of each. Prints a JSON line; `--dump` writes the pixel values as .npy')
            [CompletionResult]::new('generate-docs', 'generate-docs', [CompletionResultType]::ParameterValue, 'Write the man pages and shell completions (for packagers)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'mmllm;help;image' {
            break
        }
        'mmllm;help;video' {
            break
        }
        'mmllm;help;audio' {
            break
        }
        'mmllm;help;embeds' {
            break
        }
        'mmllm;help;batch' {
            break
        }
        'mmllm;help;merge' {
            break
        }
        'mmllm;help;serve' {
            break
        }
        'mmllm;help;profile-decode' {
            break
        }
        'mmllm;help;profile-preprocess' {
            break
        }
        'mmllm;help;generate-docs' {
            break
        }
        'mmllm;help;help' {
            break
        }
    })

    $completions.Where{ $_.CompletionText -like "$wordToComplete*" } |
        Sort-Object -Property ListItemText
}
