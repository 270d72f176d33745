// The packed-sequence core behind rega_engine._C: plan which samples share a row, deal rows across
// ranks, and materialise micro-batches straight from the memory-mapped token store.
//
// Plain C++ on raw pointers so that it runs with the GIL released; bindings.cpp owns every
// conversion from and to numpy. Errors are thrown as std::invalid_argument (ValueError in Python).
#pragma once

#include <cstdint>
#include <vector>

namespace rega {

// Label of a token that carries no loss. It must equal rega_engine.batch.IGNORE_INDEX, which is
// torch's cross_entropy default ignore_index; exported as rega_engine._C.IGNORE_INDEX so a test
// holds the two together.
constexpr int64_t kIgnoreIndex = -100;

// Best-fit-decreasing over consecutive windows of `window` samples, in the order given.
// Within a window samples are placed longest first (ties in index order) into the open bin whose
// remaining capacity fits them most tightly; a bin stays open for the window it was opened in and
// the next one, so the loose ends of one window are filled by the small samples of the next while
// the plan still streams and stays deterministic. Writes one bin id per sample into `bin_of`
// (ids 0.. in opening order, every id used) and -1 for a sample longer than `seq_len`.
// Returns the number of bins.
int64_t plan_bins(const int64_t* lengths, int64_t n, int64_t seq_len, int64_t window, int64_t* bin_of);

// Deals rows into global batches of world_size * batch_size rows, balancing real tokens across
// ranks. Rows [g*G, (g+1)*G) form global batch g (G = world_size * batch_size); the last one is
// completed with empty rows (-1). Within a global batch, rows go longest first to the rank with
// the fewest tokens so far among those with a free slot (ties to the lower rank), so every rank
// gets exactly batch_size rows. Output `out` is (num_global, world_size, batch_size) row indices.
int64_t num_global_batches(int64_t num_rows, int64_t world_size, int64_t batch_size);
void deal_rows(const int64_t* row_tokens, int64_t num_rows, int64_t world_size, int64_t batch_size,
               int64_t* out);

// Read-only view of one shard of a prepared dataset (see rega_engine/data/dataset.py): its
// offsets start at 0 and index its own tokens.
struct TokenShard {
    const int32_t* tokens;
    const uint8_t* loss_mask;
    int64_t num_tokens;
    const int64_t* offsets;  // num_samples + 1
    const uint8_t* kinds;
    const int16_t* domains;
    int64_t num_samples;
};

// The whole dataset: its shards in order. Global sample id s lives in the shard k with
// sample_base[k] <= s < sample_base[k + 1].
struct TokenStore {
    std::vector<TokenShard> shards;
    std::vector<int64_t> sample_base;  // num_shards + 1
    int64_t num_samples;
    const float* kind_weights;  // indexed by kind id
    int64_t num_kinds;
};

// Row r of a micro-batch holds the samples bin_samples[bin_splits[b]:bin_splits[b+1]] with
// b = rows[r], in that order; b == -1 is an all-padding row.
struct BatchPlan {
    const int64_t* bin_splits;
    const int64_t* bin_samples;
    int64_t num_bins;
    int64_t num_bin_samples;
    const int64_t* rows;
    int64_t num_rows;
};

// Preallocated outputs: (B, L) row-major tensors and cu_seqlens of capacity `cu_capacity`.
struct BatchOut {
    int64_t* input_ids;
    int64_t* labels;
    int64_t* position_ids;
    int64_t* kind_ids;
    int64_t* domain_ids;
    float* loss_weights;
    int32_t* cu_seqlens;
    int64_t cu_capacity;
    int64_t seq_len;  // L
};

struct BatchStats {
    int64_t num_segments;
    int64_t max_seqlen;
    int64_t num_real_tokens;
};

// Fills a micro-batch following rega_engine/batch.py: unshifted labels, kIgnoreIndex on prompt
// tokens, padding and every document's first token; positions restarting per document; one
// trailing padding segment per row that is not full.
BatchStats fill_batch(const TokenStore& store, const BatchPlan& plan, int32_t pad_id, const BatchOut& out);

}  // namespace rega
