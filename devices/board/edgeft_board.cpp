// edgeft-board: what edgeft runs on a board, linked statically against llama.cpp.
//
// It scores token ids, not text: the host tokenizes once with the model's HF tokenizer, so the board's
// perplexity uses exactly the windows and ids of every other backend (see edgeft/scoring.py, whose
// window plan this file repeats). Prompts for generation also arrive as ids.
//
// BOS: `perplexity` starts every window with the model's BOS when the GGUF's vocabulary says to add one
// (llama_vocab_get_add_bos, read as llama-perplexity reads it), and prints the id it used ("bos", -1: none);
// the host scores with the BOS its HF tokenizer adds and refuses a board whose "bos" differs. The board reads
// it from the file rather than being told, so the GGUF it runs decides, as it does for every prompt there.
// `score`, `generate` and `answers` take ids that already hold the BOS (the host rendered them).
//
//   edgeft-board perplexity MODEL IDS_FILE WINDOW STRIDE THREADS [MAX_IDS]
//                           (the first MAX_IDS ids only; also prints each scored token's NLL and top-1 id)
//   edgeft-board generate   MODEL IDS_FILE MAX_NEW THREADS
//   edgeft-board bench      MODEL N_PROMPT N_GEN THREADS
//   edgeft-board score      MODEL PIECES_FILE THREADS [MAX]  (task perplexity: one piece per line,
//                                                          "ids ... | scored positions ...")
//   edgeft-board answers    MODEL PROMPTS_FILE THREADS [MAX] (greedy answers: one prompt per line,
//                                                          "max_new | ids ...")
//
// Each prints one JSON object on stdout. IDS_FILE holds whitespace-separated token ids.
// `edgeft-board --lora ADAPTER.gguf COMMAND ...` applies a LoRA GGUF (scale 1) to the model first: the
// served base + adapter is scored exactly as llama-server computes it, without going through HTTP.
#include "llama.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

// A number as JSON: NaN and inf are not JSON, so a broken model's scores print as null.
static void print_number(const char * format, double x) {
    if (std::isfinite(x)) printf(format, x); else printf("null");
}

static std::vector<llama_token> read_ids(const char * path) {
    std::ifstream f(path);
    if (!f) { fprintf(stderr, "cannot read %s\n", path); exit(2); }
    std::vector<llama_token> ids;
    long v;
    while (f >> v) ids.push_back((llama_token) v);
    return ids;
}

// Lines of "left ... | right ...": two lists of integers per line.
static std::vector<std::pair<std::vector<long>, std::vector<long>>> read_pairs(const char * path) {
    std::ifstream f(path);
    if (!f) { fprintf(stderr, "cannot read %s\n", path); exit(2); }
    std::vector<std::pair<std::vector<long>, std::vector<long>>> out;
    std::string line;
    while (std::getline(f, line)) {
        size_t bar = line.find('|');
        if (bar == std::string::npos) continue;
        std::pair<std::vector<long>, std::vector<long>> p;
        std::istringstream left(line.substr(0, bar)), right(line.substr(bar + 1));
        long v;
        while (left >> v) p.first.push_back(v);
        while (right >> v) p.second.push_back(v);
        out.push_back(p);
    }
    return out;
}

// -log p(token) from one row of logits, in double precision like the host's scoring.
static double nll_of(const float * logits, int n_vocab, llama_token token) {
    double peak = logits[0];
    for (int v = 1; v < n_vocab; v++) peak = logits[v] > peak ? logits[v] : peak;
    double z = 0.0;
    for (int v = 0; v < n_vocab; v++) z += std::exp((double) logits[v] - peak);
    return -((double) logits[token] - peak - std::log(z));
}

static llama_token argmax(const float * logits, int n_vocab) {
    llama_token best = 0;
    for (int v = 1; v < n_vocab; v++) if (logits[v] > logits[best]) best = v;
    return best;
}

static const char * lora_path = nullptr;  // --lora, applied to every session

struct Session {
    llama_model * model = nullptr;
    llama_context * ctx = nullptr;
    const llama_vocab * vocab = nullptr;
    llama_adapter_lora * lora = nullptr;

    Session(const char * path, int n_ctx, int threads) {
        llama_log_set(quiet, nullptr);
        llama_backend_init();
        llama_model_params mp = llama_model_default_params();
        model = llama_model_load_from_file(path, mp);
        if (!model) { fprintf(stderr, "cannot load model %s\n", path); exit(2); }
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = n_ctx;
        cp.n_batch = n_ctx;
        cp.n_ubatch = n_ctx;
        cp.n_threads = threads;
        cp.n_threads_batch = threads;
        ctx = llama_init_from_model(model, cp);
        if (!ctx) { fprintf(stderr, "cannot create a context of %d tokens\n", n_ctx); exit(2); }
        vocab = llama_model_get_vocab(model);
        if (lora_path) {
            lora = llama_adapter_lora_init(model, lora_path);
            float scale = 1.0f;
            if (!lora || llama_set_adapters_lora(ctx, &lora, 1, &scale) != 0) {
                fprintf(stderr, "cannot apply the LoRA adapter %s to %s\n", lora_path, path);
                exit(2);
            }
        }
    }
    ~Session() {
        llama_free(ctx);
        if (lora) llama_adapter_lora_free(lora);
        llama_model_free(model);
        llama_backend_free();
    }

    // Decode ids[begin, end) from position 0 of a cleared cache; logits wanted for all or only the last.
    void decode(const std::vector<llama_token> & ids, size_t begin, size_t end, bool all_logits, int pos0 = 0) {
        int n = (int) (end - begin);
        llama_batch b = llama_batch_init(n, 0, 1);
        for (int i = 0; i < n; i++) {
            b.token[i] = ids[begin + i];
            b.pos[i] = pos0 + i;
            b.n_seq_id[i] = 1;
            b.seq_id[i][0] = 0;
            b.logits[i] = all_logits || i == n - 1;
        }
        b.n_tokens = n;
        if (llama_decode(ctx, b) != 0) { fprintf(stderr, "llama_decode failed\n"); exit(3); }
        llama_batch_free(b);
    }
};

static int perplexity(int argc, char ** argv) {
    if (argc != 7 && argc != 8) { fprintf(stderr, "usage: perplexity MODEL IDS WINDOW STRIDE THREADS [MAX_IDS]\n"); return 2; }
    std::vector<llama_token> ids = read_ids(argv[3]);
    int window = atoi(argv[4]), stride = atoi(argv[5]), threads = atoi(argv[6]);
    if (window < 2 || stride < 1) { fprintf(stderr, "need WINDOW >= 2 and STRIDE >= 1\n"); return 2; }
    if (argc == 8 && (size_t) atol(argv[7]) < ids.size()) ids.resize((size_t) atol(argv[7]));
    Session s(argv[2], window, threads);
    int n_vocab = llama_vocab_n_tokens(s.vocab);
    const bool add_bos = llama_vocab_get_add_bos(s.vocab);
    const llama_token bos = add_bos ? llama_vocab_bos(s.vocab) : -1;
    double start = now(), nll = 0.0;
    long count = 0, n_windows = 0;
    std::vector<double> token_nll;  // per scored token, for the host's per-token comparison
    std::vector<int> top1;
    // The same plan as edgeft.scoring.windows: with BOS a window holds BOS and WINDOW - 1 ids and its first id
    // is scored (BOS is its context); without, WINDOW ids and the first is context only.
    const size_t span = add_bos ? window - 1 : window, step = (size_t) stride < span ? stride : span;
    const size_t lead = add_bos ? 0 : 1, offset = add_bos ? 1 : 0;
    size_t n = ids.size(), scored_until = lead, begin = 0;
    std::vector<llama_token> piece;
    while (scored_until < n) {
        size_t end = begin + span < n ? begin + span : n;
        if (end > scored_until) {
            size_t score_from = scored_until > begin + lead ? scored_until : begin + lead;
            piece.assign(add_bos ? 1 : 0, bos);
            piece.insert(piece.end(), ids.begin() + begin, ids.begin() + end);
            llama_memory_clear(llama_get_memory(s.ctx), true);
            s.decode(piece, 0, piece.size(), true);
            for (size_t t = score_from; t < end; t++) {
                const float * logits = llama_get_logits_ith(s.ctx, (int) (t - begin + offset - 1));
                double token = nll_of(logits, n_vocab, ids[t]);
                nll += token;
                token_nll.push_back(token);
                top1.push_back(argmax(logits, n_vocab));
                count++;
            }
            scored_until = end;
            n_windows++;
        }
        begin += step;
    }
    printf("{\"ppl\": ");
    print_number("%.8f", std::exp(nll / count));
    printf(", \"nll_sum\": ");
    print_number("%.6f", nll);
    printf(", \"tokens\": %ld, \"windows\": %ld, \"window\": %d, \"stride\": %d, \"bos\": %d, \"seconds\": %.3f, "
           "\"token_nll\": [", count, n_windows, window, stride, (int) bos, now() - start);
    for (size_t i = 0; i < token_nll.size(); i++) {
        if (i) printf(", ");
        print_number("%.6f", token_nll[i]);
    }
    printf("], \"top1\": [");
    for (size_t i = 0; i < top1.size(); i++) printf(i ? ", %d" : "%d", top1[i]);
    printf("]}\n");
    return 0;
}

static int generate(int argc, char ** argv) {
    if (argc != 6) { fprintf(stderr, "usage: generate MODEL IDS MAX_NEW THREADS\n"); return 2; }
    std::vector<llama_token> ids = read_ids(argv[3]);
    int max_new = atoi(argv[4]), threads = atoi(argv[5]);
    Session s(argv[2], (int) ids.size() + max_new + 8, threads);
    int n_vocab = llama_vocab_n_tokens(s.vocab);
    double start = now();
    s.decode(ids, 0, ids.size(), false);
    double first = now();
    std::vector<llama_token> out;
    bool eos = false;
    for (int i = 0; i < max_new; i++) {
        llama_token best = argmax(llama_get_logits_ith(s.ctx, -1), n_vocab);
        if (llama_vocab_is_eog(s.vocab, best)) { eos = true; break; }
        out.push_back(best);
        std::vector<llama_token> one{best};
        s.decode(one, 0, 1, false, (int) (ids.size() + out.size() - 1));
    }
    double end = now();
    printf("{\"ids\": [");
    for (size_t i = 0; i < out.size(); i++) printf(i ? ", %d" : "%d", out[i]);
    printf("], \"stopped_at_eos\": %s, \"prompt_tokens\": %zu, \"prompt_seconds\": %.3f, \"decode_seconds\": %.3f}\n",
           eos ? "true" : "false", ids.size(), first - start, end - first);
    return 0;
}

static int bench(int argc, char ** argv) {
    // Prompt processing and decode speed on synthetic ids, as llama-bench's pp/tg tests measure them.
    if (argc != 6) { fprintf(stderr, "usage: bench MODEL N_PROMPT N_GEN THREADS\n"); return 2; }
    int n_prompt = atoi(argv[3]), n_gen = atoi(argv[4]), threads = atoi(argv[5]);
    Session s(argv[2], n_prompt + n_gen + 8, threads);
    int n_vocab = llama_vocab_n_tokens(s.vocab);
    std::vector<llama_token> prompt(n_prompt);
    for (int i = 0; i < n_prompt; i++) prompt[i] = (llama_token) ((i * 7919 + 13) % n_vocab);
    s.decode(prompt, 0, prompt.size(), false);  // warm-up, as llama-bench does
    llama_memory_clear(llama_get_memory(s.ctx), true);
    double t0 = now();
    s.decode(prompt, 0, prompt.size(), false);
    double t1 = now();
    llama_memory_clear(llama_get_memory(s.ctx), true);
    std::vector<llama_token> one{prompt[0]};
    double t2 = now();
    for (int i = 0; i < n_gen; i++) s.decode(one, 0, 1, false, i);
    double t3 = now();
    printf("{\"pp_tokens\": %d, \"pp_tokens_per_s\": %.3f, \"tg_tokens\": %d, \"tg_tokens_per_s\": %.3f, "
           "\"model_bytes\": %llu, \"threads\": %d}\n", n_prompt, n_prompt / (t1 - t0), n_gen, n_gen / (t3 - t2),
           (unsigned long long) llama_model_size(s.model), threads);
    return 0;
}

static int score(int argc, char ** argv) {
    // The task's perplexity: each piece decoded from an empty cache, only its listed positions scored.
    if (argc != 5 && argc != 6) { fprintf(stderr, "usage: score MODEL PIECES THREADS [MAX]\n"); return 2; }
    auto pieces = read_pairs(argv[3]);
    if (argc == 6 && (size_t) atol(argv[5]) < pieces.size()) pieces.resize((size_t) atol(argv[5]));
    size_t longest = 2;
    for (auto & p : pieces) longest = p.first.size() > longest ? p.first.size() : longest;
    Session s(argv[2], (int) longest, atoi(argv[4]));
    int n_vocab = llama_vocab_n_tokens(s.vocab);
    double start = now(), nll = 0.0;
    long count = 0;
    for (auto & p : pieces) {
        std::vector<llama_token> ids(p.first.begin(), p.first.end());
        llama_memory_clear(llama_get_memory(s.ctx), true);
        s.decode(ids, 0, ids.size(), true);
        for (long t : p.second) {
            nll += nll_of(llama_get_logits_ith(s.ctx, (int) t - 1), n_vocab, ids[t]);
            count++;
        }
    }
    printf("{\"ppl\": %.8f, \"nll_sum\": %.6f, \"tokens\": %ld, \"pieces\": %zu, \"seconds\": %.3f}\n",
           std::exp(nll / count), nll, count, pieces.size(), now() - start);
    return 0;
}

static int answers(int argc, char ** argv) {
    // Greedy answers to several prompts in one model load, each from an empty cache.
    if (argc != 5 && argc != 6) { fprintf(stderr, "usage: answers MODEL PROMPTS THREADS [MAX]\n"); return 2; }
    auto prompts = read_pairs(argv[3]);
    if (argc == 6 && (size_t) atol(argv[5]) < prompts.size()) prompts.resize((size_t) atol(argv[5]));
    size_t longest = 8;
    for (auto & p : prompts) {
        size_t need = p.second.size() + (p.first.empty() ? 0 : p.first[0]) + 8;
        longest = need > longest ? need : longest;
    }
    Session s(argv[2], (int) longest, atoi(argv[4]));
    int n_vocab = llama_vocab_n_tokens(s.vocab);
    double start = now();
    printf("{\"answers\": [");
    for (size_t k = 0; k < prompts.size(); k++) {
        int max_new = prompts[k].first.empty() ? 0 : (int) prompts[k].first[0];
        std::vector<llama_token> ids(prompts[k].second.begin(), prompts[k].second.end());
        llama_memory_clear(llama_get_memory(s.ctx), true);
        s.decode(ids, 0, ids.size(), false);
        printf(k ? ", [" : "[");
        for (int i = 0; i < max_new; i++) {
            llama_token best = argmax(llama_get_logits_ith(s.ctx, -1), n_vocab);
            if (llama_vocab_is_eog(s.vocab, best)) break;
            printf(i ? ", %d" : "%d", best);
            std::vector<llama_token> one{best};
            s.decode(one, 0, 1, false, (int) (ids.size() + i));
        }
        printf("]");
    }
    printf("], \"seconds\": %.3f}\n", now() - start);
    return 0;
}

int main(int argc, char ** argv) {
    if (argc > 2 && std::string(argv[1]) == "--lora") {
        lora_path = argv[2];
        argv[2] = argv[0];  // drop the two words: commands read their arguments by position
        argv += 2;
        argc -= 2;
    }
    std::string cmd = argc > 1 ? argv[1] : "";
    if (cmd == "perplexity") return perplexity(argc, argv);
    if (cmd == "generate") return generate(argc, argv);
    if (cmd == "bench") return bench(argc, argv);
    if (cmd == "score") return score(argc, argv);
    if (cmd == "answers") return answers(argc, argv);
    fprintf(stderr, "usage: edgeft-board perplexity|generate|bench|score|answers ...\n");
    return 2;
}
