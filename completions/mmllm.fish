# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_mmllm_global_optspecs
    string join \n h/help V/version
end

function __fish_mmllm_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_mmllm_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_mmllm_using_subcommand
    set -l cmd (__fish_mmllm_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c mmllm -n "__fish_mmllm_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c mmllm -n "__fish_mmllm_needs_command" -s V -l version -d 'Print version'
complete -c mmllm -n "__fish_mmllm_needs_command" -f -a "image" -d 'Prompt a model with one or more images'
complete -c mmllm -n "__fish_mmllm_needs_command" -f -a "video" -d 'Prompt a model with a video file or a directory of frames'
complete -c mmllm -n "__fish_mmllm_needs_command" -f -a "audio" -d 'Prompt a model with audio (WAV, mp3, flac, ogg, m4a, .npy)'
complete -c mmllm -n "__fish_mmllm_needs_command" -f -a "embeds" -d 'Prompt a model with precomputed embeddings instead of raw media'
complete -c mmllm -n "__fish_mmllm_needs_command" -f -a "batch" -d 'Run a YAML (or JSONL) manifest of jobs, writing one JSONL result per job'
complete -c mmllm -n "__fish_mmllm_needs_command" -f -a "merge" -d 'Join the outputs of sharded batch runs into one JSONL file, in manifest order'
complete -c mmllm -n "__fish_mmllm_needs_command" -f -a "serve" -d 'Serve the model over HTTP with the OpenAI Chat Completions API (POST /v1/chat/completions, GET /v1/models, /health, /metrics); concurrent requests share one continuous batch. SIGTERM stops new requests and lets in-flight ones finish'
complete -c mmllm -n "__fish_mmllm_needs_command" -f -a "profile-decode" -d 'Time single-token decode steps of a model (for bench/gpu.py): step wall time, host time to enqueue a step and GPU time to run it. Prints a JSON line'
complete -c mmllm -n "__fish_mmllm_needs_command" -f -a "profile-preprocess" -d 'Time decoding an image file and one image processor on it (for bench/cpu.py): the best of `--runs` runs of each. Prints a JSON line; `--dump` writes the pixel values as .npy'
complete -c mmllm -n "__fish_mmllm_needs_command" -f -a "generate-docs" -d 'Write the man pages and shell completions (for packagers)'
complete -c mmllm -n "__fish_mmllm_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -s p -l prompt -d 'The prompt text (then every positional argument is a media item); - reads stdin' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l system -d 'System prompt, added as a system turn of the chat template' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l chat-template -d 'Jinja chat template file overriding the model\'s' -r -F
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l limit-mm-per-prompt -d 'Maximum media items per prompt, e.g. image=2,video=1,audio=1 (default: the model\'s)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -s m -l model -d 'Model: an alias (llava, qwen2-vl, ...), a Hugging Face repo id, or a local directory' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -s o -l output -d 'Output format: text streams tokens to stdout; jsonl prints one JSON object per prompt' -r -f -a "text\t''
jsonl\t''"
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l max-tokens -d 'Maximum number of tokens to generate [default: 256]' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l temperature -d 'Sampling temperature; 0 is greedy decoding [default: 0]' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l top-p -d 'Nucleus sampling: keep the smallest set of tokens whose probability reaches P' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l top-k -d 'Keep only the K most likely tokens when sampling' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l repetition-penalty -d 'Penalise tokens already in the prompt or output (1.0 = off), as Hugging Face does' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l seed -d 'Random seed for sampling [default: 0]' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l stop -d 'Stop generating when this text appears (repeatable); it is not printed' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l logprobs -d 'Also report the N most likely tokens and their log-probabilities at each step (jsonl)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l device -d 'Device: auto, cpu, cuda or cuda:N' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l dtype -d 'Weights dtype: auto (bf16 on CUDA, f32 on CPU), bf16, f16 or f32' -r -f -a "auto\t''
bf16\t''
f16\t''
f32\t''"
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l id -d 'Id reported in jsonl output' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l min-pixels -d 'Minimum pixels per image or video frame after resizing (models that resize by pixel budget, e.g. Qwen2-VL; default: the model\'s processor config)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l max-pixels -d 'Maximum pixels per image or video frame after resizing (models that resize by pixel budget, e.g. Qwen2-VL; default: the model\'s processor config)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l max-slice-nums -d 'The most slices one high-resolution image is cut into (MiniCPM-V\'s processor kwarg `max_slice_nums`; default: the model\'s processor config)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l num-crops -d 'Most 336-pixel crops an image is tiled into (models that tile images into a grid of crops, e.g. Phi-3-vision; default: the model\'s processor config)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l raw -d 'Send the prompt verbatim, without the chat template; it must contain one placeholder (e.g. <image>) per media item'
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l ignore-eos -d 'Keep generating past the end-of-sequence token (for benchmarks)'
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l dry-run -d 'Decode the inputs and print the validated plan as JSON without loading weights'
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -l allow-private-media-urls -d 'Allow media URLs on loopback, private, link-local and cloud-metadata addresses (refused by default, as a server must)'
complete -c mmllm -n "__fish_mmllm_using_subcommand image" -s h -l help -d 'Print help'
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -s p -l prompt -d 'The prompt text (then every positional argument is a media item); - reads stdin' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l system -d 'System prompt, added as a system turn of the chat template' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l chat-template -d 'Jinja chat template file overriding the model\'s' -r -F
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l limit-mm-per-prompt -d 'Maximum media items per prompt, e.g. image=2,video=1,audio=1 (default: the model\'s)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -s m -l model -d 'Model: an alias (llava, qwen2-vl, ...), a Hugging Face repo id, or a local directory' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -s o -l output -d 'Output format: text streams tokens to stdout; jsonl prints one JSON object per prompt' -r -f -a "text\t''
jsonl\t''"
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l max-tokens -d 'Maximum number of tokens to generate [default: 256]' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l temperature -d 'Sampling temperature; 0 is greedy decoding [default: 0]' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l top-p -d 'Nucleus sampling: keep the smallest set of tokens whose probability reaches P' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l top-k -d 'Keep only the K most likely tokens when sampling' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l repetition-penalty -d 'Penalise tokens already in the prompt or output (1.0 = off), as Hugging Face does' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l seed -d 'Random seed for sampling [default: 0]' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l stop -d 'Stop generating when this text appears (repeatable); it is not printed' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l logprobs -d 'Also report the N most likely tokens and their log-probabilities at each step (jsonl)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l device -d 'Device: auto, cpu, cuda or cuda:N' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l dtype -d 'Weights dtype: auto (bf16 on CUDA, f32 on CPU), bf16, f16 or f32' -r -f -a "auto\t''
bf16\t''
f16\t''
f32\t''"
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l id -d 'Id reported in jsonl output' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l min-pixels -d 'Minimum pixels per image or video frame after resizing (models that resize by pixel budget, e.g. Qwen2-VL; default: the model\'s processor config)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l max-pixels -d 'Maximum pixels per image or video frame after resizing (models that resize by pixel budget, e.g. Qwen2-VL; default: the model\'s processor config)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l max-slice-nums -d 'The most slices one high-resolution image is cut into (MiniCPM-V\'s processor kwarg `max_slice_nums`; default: the model\'s processor config)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l num-crops -d 'Most 336-pixel crops an image is tiled into (models that tile images into a grid of crops, e.g. Phi-3-vision; default: the model\'s processor config)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l num-frames -d 'Sample N frames uniformly over the whole video' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l fps -d 'Sample frames at F frames per second' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l raw -d 'Send the prompt verbatim, without the chat template; it must contain one placeholder (e.g. <image>) per media item'
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l ignore-eos -d 'Keep generating past the end-of-sequence token (for benchmarks)'
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l dry-run -d 'Decode the inputs and print the validated plan as JSON without loading weights'
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l allow-private-media-urls -d 'Allow media URLs on loopback, private, link-local and cloud-metadata addresses (refused by default, as a server must)'
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -l as-images -d 'Send the sampled frames as a multi-image prompt (counted against the image limit)'
complete -c mmllm -n "__fish_mmllm_using_subcommand video" -s h -l help -d 'Print help'
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -s p -l prompt -d 'The prompt text (then every positional argument is a media item); - reads stdin' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l system -d 'System prompt, added as a system turn of the chat template' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l chat-template -d 'Jinja chat template file overriding the model\'s' -r -F
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l limit-mm-per-prompt -d 'Maximum media items per prompt, e.g. image=2,video=1,audio=1 (default: the model\'s)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -s m -l model -d 'Model: an alias (llava, qwen2-vl, ...), a Hugging Face repo id, or a local directory' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -s o -l output -d 'Output format: text streams tokens to stdout; jsonl prints one JSON object per prompt' -r -f -a "text\t''
jsonl\t''"
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l max-tokens -d 'Maximum number of tokens to generate [default: 256]' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l temperature -d 'Sampling temperature; 0 is greedy decoding [default: 0]' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l top-p -d 'Nucleus sampling: keep the smallest set of tokens whose probability reaches P' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l top-k -d 'Keep only the K most likely tokens when sampling' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l repetition-penalty -d 'Penalise tokens already in the prompt or output (1.0 = off), as Hugging Face does' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l seed -d 'Random seed for sampling [default: 0]' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l stop -d 'Stop generating when this text appears (repeatable); it is not printed' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l logprobs -d 'Also report the N most likely tokens and their log-probabilities at each step (jsonl)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l device -d 'Device: auto, cpu, cuda or cuda:N' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l dtype -d 'Weights dtype: auto (bf16 on CUDA, f32 on CPU), bf16, f16 or f32' -r -f -a "auto\t''
bf16\t''
f16\t''
f32\t''"
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l id -d 'Id reported in jsonl output' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l sample-rate -d 'Sample rate of .npy inputs (raw float arrays carry none)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l raw -d 'Send the prompt verbatim, without the chat template; it must contain one placeholder (e.g. <image>) per media item'
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l ignore-eos -d 'Keep generating past the end-of-sequence token (for benchmarks)'
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l dry-run -d 'Decode the inputs and print the validated plan as JSON without loading weights'
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -l allow-private-media-urls -d 'Allow media URLs on loopback, private, link-local and cloud-metadata addresses (refused by default, as a server must)'
complete -c mmllm -n "__fish_mmllm_using_subcommand audio" -s h -l help -d 'Print help'
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -s p -l prompt -d 'The prompt text (then every positional argument is a media item); - reads stdin' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l system -d 'System prompt, added as a system turn of the chat template' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l chat-template -d 'Jinja chat template file overriding the model\'s' -r -F
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l limit-mm-per-prompt -d 'Maximum media items per prompt, e.g. image=2,video=1,audio=1 (default: the model\'s)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -s m -l model -d 'Model: an alias (llava, qwen2-vl, ...), a Hugging Face repo id, or a local directory' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -s o -l output -d 'Output format: text streams tokens to stdout; jsonl prints one JSON object per prompt' -r -f -a "text\t''
jsonl\t''"
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l max-tokens -d 'Maximum number of tokens to generate [default: 256]' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l temperature -d 'Sampling temperature; 0 is greedy decoding [default: 0]' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l top-p -d 'Nucleus sampling: keep the smallest set of tokens whose probability reaches P' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l top-k -d 'Keep only the K most likely tokens when sampling' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l repetition-penalty -d 'Penalise tokens already in the prompt or output (1.0 = off), as Hugging Face does' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l seed -d 'Random seed for sampling [default: 0]' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l stop -d 'Stop generating when this text appears (repeatable); it is not printed' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l logprobs -d 'Also report the N most likely tokens and their log-probabilities at each step (jsonl)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l device -d 'Device: auto, cpu, cuda or cuda:N' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l dtype -d 'Weights dtype: auto (bf16 on CUDA, f32 on CPU), bf16, f16 or f32' -r -f -a "auto\t''
bf16\t''
f16\t''
f32\t''"
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l id -d 'Id reported in jsonl output' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l modality -d 'Which modality the embeddings stand for' -r -f -a "image\t''
video\t''
audio\t''"
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l image-grid-thw -d 'image_grid_thw tensor (num_items, 3) for Qwen2-VL, when not in the embeds file' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l image-sizes -d 'image_sizes tensor for MiniCPM-V, when not in the embeds file' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l raw -d 'Send the prompt verbatim, without the chat template; it must contain one placeholder (e.g. <image>) per media item'
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l ignore-eos -d 'Keep generating past the end-of-sequence token (for benchmarks)'
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l dry-run -d 'Decode the inputs and print the validated plan as JSON without loading weights'
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -l allow-private-media-urls -d 'Allow media URLs on loopback, private, link-local and cloud-metadata addresses (refused by default, as a server must)'
complete -c mmllm -n "__fish_mmllm_using_subcommand embeds" -s h -l help -d 'Print help'
complete -c mmllm -n "__fish_mmllm_using_subcommand batch" -s o -l output -d 'Write results here (JSONL) instead of stdout; {shard} in the path becomes the shard, K-of-N with K zero-padded (out-{shard}.jsonl: out-03-of-12.jsonl)' -r -F
complete -c mmllm -n "__fish_mmllm_using_subcommand batch" -l shard -d 'Run only shard K of N (0-based): the jobs whose id hashes to K (FNV-1a 64 of the id, mod N). The whole manifest is still validated. Overrides the environment' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand batch" -l shards -d 'Number of shards when the shard index comes from the environment: Kubernetes\' JOB_COMPLETION_INDEX, or a Slurm task whose SLURM_ARRAY_TASK_ID is then the index itself (to rerun some tasks: --array=3,7). Also MMLLM_SHARDS=N. Without --shard or --shards, a Slurm array task takes shard ID-MIN of SLURM_ARRAY_TASK_COUNT' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand batch" -l media-root -d 'Confine the manifest\'s local files (media, embeds, extra tensors, chat templates) to DIR: each path is resolved (`..` and symlinks followed) and must lie inside it. For manifests from an untrusted source; model folders and URLs are not affected' -r -F
complete -c mmllm -n "__fish_mmllm_using_subcommand batch" -l max-seqs -d 'Most sequences of one model generated at once (continuous batching)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand batch" -l device -d 'Device: auto, cpu, cuda or cuda:N' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand batch" -l dtype -d 'Weights dtype: auto (bf16 on CUDA, f32 on CPU), bf16, f16 or f32' -r -f -a "auto\t''
bf16\t''
f16\t''
f32\t''"
complete -c mmllm -n "__fish_mmllm_using_subcommand batch" -l strict -d 'Check every job\'s media before running any, and fail listing all problems'
complete -c mmllm -n "__fish_mmllm_using_subcommand batch" -l resume -d 'Skip jobs whose id already has a result in the output file, and append'
complete -c mmllm -n "__fish_mmllm_using_subcommand batch" -l unordered -d 'Write results in completion order instead of manifest order'
complete -c mmllm -n "__fish_mmllm_using_subcommand batch" -l allow-private-media-urls -d 'Allow media URLs on loopback, private, link-local and cloud-metadata addresses'
complete -c mmllm -n "__fish_mmllm_using_subcommand batch" -s h -l help -d 'Print help'
complete -c mmllm -n "__fish_mmllm_using_subcommand merge" -s o -l output -d 'Write the merged JSONL here instead of stdout' -r -F
complete -c mmllm -n "__fish_mmllm_using_subcommand merge" -l manifest -d 'The manifest the runs came from: lines follow its order, and jobs with no result (missing, or only error lines) are listed with exit status 1. Without it, ids keep the order in which the inputs first name them' -r -F
complete -c mmllm -n "__fish_mmllm_using_subcommand merge" -s h -l help -d 'Print help'
complete -c mmllm -n "__fish_mmllm_using_subcommand serve" -s m -l model -d 'Model: an alias (llava, qwen2-vl, ...), a Hugging Face repo id, or a local directory. Requests must name it as their `model`' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand serve" -l host -d 'Address to listen on' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand serve" -l port -d 'Port to listen on (0: any free port; the address is printed on stderr)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand serve" -l api-key -d 'Require `Authorization: Bearer KEY` on /v1 requests' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand serve" -l allowed-local-media-path -d 'Serve file:// media URLs below this directory (after resolving .. and links); without it file:// URLs are refused' -r -F
complete -c mmllm -n "__fish_mmllm_using_subcommand serve" -l allowed-media-domains -d 'Fetch media URLs only from these hosts (comma-separated, exact host names)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand serve" -l limit-mm-per-prompt -d 'Maximum media items per prompt, e.g. image=2,video=1,audio=1 (default: the model\'s)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand serve" -l max-seqs -d 'Most sequences generated at once (continuous batching)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand serve" -l max-waiting -d 'Requests queued beyond --max-seqs before new ones get 429 with Retry-After' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand serve" -l max-request-bytes -d 'Largest request body in bytes (base64 media included); larger ones get 413' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand serve" -l shutdown-grace -d 'Seconds in-flight requests may take to finish after SIGTERM' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand serve" -l device -d 'Device: auto, cpu, cuda or cuda:N' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand serve" -l dtype -d 'Weights dtype: auto (bf16 on CUDA, f32 on CPU), bf16, f16 or f32' -r -f -a "auto\t''
bf16\t''
f16\t''
f32\t''"
complete -c mmllm -n "__fish_mmllm_using_subcommand serve" -l allow-private-media-urls -d 'Allow media URLs on loopback, private, link-local and cloud-metadata addresses'
complete -c mmllm -n "__fish_mmllm_using_subcommand serve" -s h -l help -d 'Print help'
complete -c mmllm -n "__fish_mmllm_using_subcommand profile-decode" -l model -r
complete -c mmllm -n "__fish_mmllm_using_subcommand profile-decode" -l device -r
complete -c mmllm -n "__fish_mmllm_using_subcommand profile-decode" -l dtype -r -f -a "auto\t''
bf16\t''
f16\t''
f32\t''"
complete -c mmllm -n "__fish_mmllm_using_subcommand profile-decode" -l context -d 'Prompt length (token ids 1..) prefilled before the timed steps' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand profile-decode" -l steps -d 'Decode steps timed (after 8 untimed ones)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand profile-decode" -l image -d 'Also time encoding this image (preprocessing and vision tower)' -r -F
complete -c mmllm -n "__fish_mmllm_using_subcommand profile-decode" -s h -l help -d 'Print help'
complete -c mmllm -n "__fish_mmllm_using_subcommand profile-preprocess" -l processor -d 'Which processor: transformers\' slow `CLIPImageProcessor` or `Qwen2VLImageProcessor`' -r -f -a "clip\t''
qwen2-vl\t''"
complete -c mmllm -n "__fish_mmllm_using_subcommand profile-preprocess" -l config -d 'A `preprocessor_config.json` (default: the processor\'s transformers defaults)' -r -F
complete -c mmllm -n "__fish_mmllm_using_subcommand profile-preprocess" -l runs -d 'Timed runs of decode and of preprocessing (after one untimed run)' -r
complete -c mmllm -n "__fish_mmllm_using_subcommand profile-preprocess" -l dump -d 'Write the `pixel_values` (f32, the processor\'s output shape) to this .npy file' -r -F
complete -c mmllm -n "__fish_mmllm_using_subcommand profile-preprocess" -s h -l help -d 'Print help'
complete -c mmllm -n "__fish_mmllm_using_subcommand generate-docs" -l out-dir -d 'Directory under which `man/` and `completions/` are written' -r -F
complete -c mmllm -n "__fish_mmllm_using_subcommand generate-docs" -s h -l help -d 'Print help'
complete -c mmllm -n "__fish_mmllm_using_subcommand help; and not __fish_seen_subcommand_from image video audio embeds batch merge serve profile-decode profile-preprocess generate-docs help" -f -a "image" -d 'Prompt a model with one or more images'
complete -c mmllm -n "__fish_mmllm_using_subcommand help; and not __fish_seen_subcommand_from image video audio embeds batch merge serve profile-decode profile-preprocess generate-docs help" -f -a "video" -d 'Prompt a model with a video file or a directory of frames'
complete -c mmllm -n "__fish_mmllm_using_subcommand help; and not __fish_seen_subcommand_from image video audio embeds batch merge serve profile-decode profile-preprocess generate-docs help" -f -a "audio" -d 'Prompt a model with audio (WAV, mp3, flac, ogg, m4a, .npy)'
complete -c mmllm -n "__fish_mmllm_using_subcommand help; and not __fish_seen_subcommand_from image video audio embeds batch merge serve profile-decode profile-preprocess generate-docs help" -f -a "embeds" -d 'Prompt a model with precomputed embeddings instead of raw media'
complete -c mmllm -n "__fish_mmllm_using_subcommand help; and not __fish_seen_subcommand_from image video audio embeds batch merge serve profile-decode profile-preprocess generate-docs help" -f -a "batch" -d 'Run a YAML (or JSONL) manifest of jobs, writing one JSONL result per job'
complete -c mmllm -n "__fish_mmllm_using_subcommand help; and not __fish_seen_subcommand_from image video audio embeds batch merge serve profile-decode profile-preprocess generate-docs help" -f -a "merge" -d 'Join the outputs of sharded batch runs into one JSONL file, in manifest order'
complete -c mmllm -n "__fish_mmllm_using_subcommand help; and not __fish_seen_subcommand_from image video audio embeds batch merge serve profile-decode profile-preprocess generate-docs help" -f -a "serve" -d 'Serve the model over HTTP with the OpenAI Chat Completions API (POST /v1/chat/completions, GET /v1/models, /health, /metrics); concurrent requests share one continuous batch. SIGTERM stops new requests and lets in-flight ones finish'
complete -c mmllm -n "__fish_mmllm_using_subcommand help; and not __fish_seen_subcommand_from image video audio embeds batch merge serve profile-decode profile-preprocess generate-docs help" -f -a "profile-decode" -d 'Time single-token decode steps of a model (for bench/gpu.py): step wall time, host time to enqueue a step and GPU time to run it. Prints a JSON line'
complete -c mmllm -n "__fish_mmllm_using_subcommand help; and not __fish_seen_subcommand_from image video audio embeds batch merge serve profile-decode profile-preprocess generate-docs help" -f -a "profile-preprocess" -d 'Time decoding an image file and one image processor on it (for bench/cpu.py): the best of `--runs` runs of each. Prints a JSON line; `--dump` writes the pixel values as .npy'
complete -c mmllm -n "__fish_mmllm_using_subcommand help; and not __fish_seen_subcommand_from image video audio embeds batch merge serve profile-decode profile-preprocess generate-docs help" -f -a "generate-docs" -d 'Write the man pages and shell completions (for packagers)'
complete -c mmllm -n "__fish_mmllm_using_subcommand help; and not __fish_seen_subcommand_from image video audio embeds batch merge serve profile-decode profile-preprocess generate-docs help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
