#include "packer.h"

#include <algorithm>
#include <climits>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>

namespace rega {
namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

// Set of integers 0..n-1 answering "smallest member >= x" in O(log64 n): one bit per value, and
// above it one bit per non-empty 64-bit word, up to a single word. Bin capacities are bounded by
// seq_len, so this is smaller and faster than a balanced tree over the bins themselves.
class CapacitySet {
public:
    explicit CapacitySet(int64_t n) {
        int64_t size = std::max<int64_t>(n, 1);
        do {
            const int64_t words = (size + 63) / 64;
            levels_.emplace_back(static_cast<size_t>(words), 0);
            size = words;
        } while (size > 1);
    }

    void insert(int64_t i) {
        for (auto& level : levels_) {
            uint64_t& word = level[static_cast<size_t>(i >> 6)];
            const bool had_members = word != 0;
            word |= uint64_t{1} << (i & 63);
            if (had_members) return;  // the levels above already know this word is non-empty
            i >>= 6;
        }
    }

    void erase(int64_t i) {
        for (auto& level : levels_) {
            uint64_t& word = level[static_cast<size_t>(i >> 6)];
            word &= ~(uint64_t{1} << (i & 63));
            if (word != 0) return;
            i >>= 6;
        }
    }

    // Smallest member >= i, or -1.
    int64_t find_next(int64_t i) const {
        size_t level = 0;
        for (;; ++level) {
            if (level == levels_.size()) return -1;
            const auto& words = levels_[level];
            const int64_t w = i >> 6;
            if (w >= static_cast<int64_t>(words.size())) return -1;
            const uint64_t bits = words[static_cast<size_t>(w)] & (~uint64_t{0} << (i & 63));
            if (bits != 0) {
                i = (w << 6) | __builtin_ctzll(bits);
                break;
            }
            i = w + 1;  // the next word at this level is bit w + 1 one level up
        }
        while (level > 0) {
            --level;
            i = (i << 6) | __builtin_ctzll(levels_[level][static_cast<size_t>(i)]);
        }
        return i;
    }

private:
    std::vector<std::vector<uint64_t>> levels_;
};

}  // namespace

int64_t plan_bins(const int64_t* lengths, int64_t n, int64_t seq_len, int64_t window, int64_t* bin_of) {
    if (n < 0) fail("plan_bins: negative sample count");
    if (seq_len < 1) fail("plan_bins: seq_len must be >= 1, got " + std::to_string(seq_len));
    if (window < 1) fail("plan_bins: window must be >= 1, got " + std::to_string(window));
    if (n > INT32_MAX) fail("plan_bins: at most 2^31 - 1 samples per call");
    window = std::min(window, std::max<int64_t>(n, 1));

    // Open bins with exactly c free slots form an intrusive stack: top[c] is the newest, below[b]
    // the next one down. A stack fixes the choice among equal fits (deterministic) and costs one
    // array slot per bin, with no allocation per capacity.
    // 32-bit ids keep the stacks' links of the bins still open within a few hundred KiB.
    constexpr int32_t kNone = -1;
    std::vector<int32_t> top(static_cast<size_t>(seq_len) + 1, kNone);
    std::vector<int32_t> below;
    std::vector<int32_t> opened_in;  // window index of each bin
    CapacitySet free_slots(seq_len + 1);
    // Per window: samples per length, where each length's run starts in `order`, and a write cursor.
    std::vector<int64_t> count(static_cast<size_t>(seq_len) + 1);
    std::vector<int64_t> first(static_cast<size_t>(seq_len) + 1);
    std::vector<int64_t> slot(static_cast<size_t>(seq_len) + 1);
    std::vector<int32_t> order;  // window-relative sample indices, longest first

    auto open_bin = [&](int64_t window_index) {
        below.push_back(kNone);
        opened_in.push_back(static_cast<int32_t>(window_index));
        return static_cast<int32_t>(below.size() - 1);
    };
    auto push = [&](int32_t bin, int64_t free) {
        if (free <= 0) return;  // a full bin can take nothing more
        int32_t& head = top[static_cast<size_t>(free)];
        if (head == kNone) free_slots.insert(free);
        below[static_cast<size_t>(bin)] = head;
        head = bin;
    };
    auto pop = [&](int64_t free) {
        int32_t& head = top[static_cast<size_t>(free)];
        const int32_t bin = head;
        head = below[static_cast<size_t>(bin)];
        if (head == kNone) free_slots.erase(free);
        return bin;
    };

    int64_t window_index = 0;
    for (int64_t start = 0; start < n; start += window, ++window_index) {
        const int64_t end = std::min(n, start + window);

        for (int64_t i = start; i < end; ++i) {
            if (lengths[i] < 0) {
                fail("plan_bins: lengths[" + std::to_string(i) + "] = " + std::to_string(lengths[i]) + " is negative");
            }
            if (lengths[i] > seq_len) bin_of[i] = -1;
        }
        auto place = [&](int64_t i, int64_t len) {
            if (len == 0) {
                // Takes no room: it rides along with the newest bin rather than opening an empty row.
                if (below.empty()) push(open_bin(window_index), seq_len);
                bin_of[i] = static_cast<int64_t>(below.size()) - 1;
                return;
            }
            const int64_t fit = free_slots.find_next(len);
            int32_t bin;
            if (fit < 0) {
                bin = open_bin(window_index);
                push(bin, seq_len - len);
            } else {
                bin = pop(fit);
                push(bin, fit - len);
            }
            bin_of[i] = bin;
        };

        // Longest first, ties in index order.
        if ((end - start) * 4 >= seq_len) {
            // Counting sort: linear as lengths are bounded by seq_len, and walking it bucket by
            // bucket gives each sample's length without a random read of `lengths`.
            std::fill(count.begin(), count.end(), 0);
            for (int64_t i = start; i < end; ++i) {
                if (lengths[i] <= seq_len) ++count[static_cast<size_t>(lengths[i])];
            }
            int64_t placed = 0;
            for (int64_t len = seq_len; len >= 0; --len) {
                first[static_cast<size_t>(len)] = placed;
                slot[static_cast<size_t>(len)] = placed;
                placed += count[static_cast<size_t>(len)];
            }
            order.resize(static_cast<size_t>(placed));
            for (int64_t i = start; i < end; ++i) {
                const int64_t len = lengths[i];
                if (len <= seq_len) order[static_cast<size_t>(slot[static_cast<size_t>(len)]++)] = static_cast<int32_t>(i - start);
            }
            for (int64_t len = seq_len; len >= 0; --len) {
                const int32_t* it = order.data() + first[static_cast<size_t>(len)];
                const int32_t* const stop = it + count[static_cast<size_t>(len)];
                for (; it != stop; ++it) place(start + *it, len);
            }
        } else {
            // A window much smaller than seq_len: a comparison sort avoids O(seq_len) work per window.
            order.clear();
            for (int64_t i = start; i < end; ++i) {
                if (lengths[i] <= seq_len) order.push_back(static_cast<int32_t>(i - start));
            }
            std::stable_sort(order.begin(), order.end(),
                             [&](int32_t a, int32_t b) { return lengths[start + a] > lengths[start + b]; });
            for (const int32_t rel : order) place(start + rel, lengths[start + rel]);
        }

        // Bins opened in an earlier window have had their second window: close them, so that the
        // plan streams and no bin waits on samples far away in the order. Survivors keep their order.
        for (int64_t c = free_slots.find_next(1); c >= 0; c = free_slots.find_next(c + 1)) {
            int32_t* link = &top[static_cast<size_t>(c)];
            while (*link != kNone) {
                const size_t bin = static_cast<size_t>(*link);
                if (opened_in[bin] < window_index) {
                    *link = below[bin];
                } else {
                    link = &below[bin];
                }
            }
            if (top[static_cast<size_t>(c)] == kNone) free_slots.erase(c);
        }
    }
    return static_cast<int64_t>(below.size());
}

int64_t num_global_batches(int64_t num_rows, int64_t world_size, int64_t batch_size) {
    if (world_size < 1 || batch_size < 1) fail("deal_rows: world_size and batch_size must be >= 1");
    const int64_t per_global = world_size * batch_size;
    return (num_rows + per_global - 1) / per_global;
}

void deal_rows(const int64_t* row_tokens, int64_t num_rows, int64_t world_size, int64_t batch_size,
               int64_t* out) {
    const int64_t num_global = num_global_batches(num_rows, world_size, batch_size);
    const int64_t per_global = world_size * batch_size;
    for (int64_t r = 0; r < num_rows; ++r) {
        if (row_tokens[r] < 0) fail("deal_rows: row_tokens[" + std::to_string(r) + "] is negative");
    }
    auto tokens_of = [&](int64_t row) { return row < 0 ? int64_t{0} : row_tokens[row]; };

    std::vector<int64_t> rows(static_cast<size_t>(per_global));
    std::vector<int64_t> filled(static_cast<size_t>(world_size));
    using Load = std::pair<int64_t, int64_t>;  // (tokens so far, rank): the smallest pair wins
    std::vector<Load> heap;
    heap.reserve(static_cast<size_t>(world_size));

    for (int64_t g = 0; g < num_global; ++g) {
        for (int64_t j = 0; j < per_global; ++j) {
            const int64_t row = g * per_global + j;
            rows[static_cast<size_t>(j)] = row < num_rows ? row : -1;
        }
        std::stable_sort(rows.begin(), rows.end(),
                         [&](int64_t a, int64_t b) { return tokens_of(a) > tokens_of(b); });
        heap.clear();
        for (int64_t rank = 0; rank < world_size; ++rank) heap.emplace_back(0, rank);
        std::make_heap(heap.begin(), heap.end(), std::greater<Load>());
        std::fill(filled.begin(), filled.end(), 0);
        for (const int64_t row : rows) {
            std::pop_heap(heap.begin(), heap.end(), std::greater<Load>());
            Load least = heap.back();
            heap.pop_back();
            const int64_t rank = least.second;
            out[(g * world_size + rank) * batch_size + filled[static_cast<size_t>(rank)]++] = row;
            if (filled[static_cast<size_t>(rank)] < batch_size) {
                heap.emplace_back(least.first + tokens_of(row), rank);
                std::push_heap(heap.begin(), heap.end(), std::greater<Load>());
            }
        }
    }
}

namespace {

// The samples of row r as a [first, last) range into bin_samples, checked against the plan.
std::pair<int64_t, int64_t> row_range(const BatchPlan& plan, int64_t r) {
    const int64_t bin = plan.rows[r];
    if (bin < 0) return {0, 0};
    if (bin >= plan.num_bins) {
        fail("fill_batch: row " + std::to_string(r) + " names bin " + std::to_string(bin) + " but the plan has " +
             std::to_string(plan.num_bins) + " bins");
    }
    const int64_t first = plan.bin_splits[bin];
    const int64_t last = plan.bin_splits[bin + 1];
    if (first < 0 || first > last || last > plan.num_bin_samples) {
        fail("fill_batch: bin_splits is not a valid partition of bin_samples at bin " + std::to_string(bin));
    }
    return {first, last};
}

// (shard, local sample id) of global sample bin_samples[k], checked against the store.
std::pair<const TokenShard*, int64_t> sample_checked(const TokenStore& store, const BatchPlan& plan, int64_t k) {
    const int64_t s = plan.bin_samples[k];
    if (s < 0 || s >= store.num_samples) {
        fail("fill_batch: sample id " + std::to_string(s) + " out of range for a dataset of " +
             std::to_string(store.num_samples) + " samples");
    }
    // The first shard whose end lies beyond s; with one shard this is one comparison.
    const auto it = std::upper_bound(store.sample_base.begin() + 1, store.sample_base.end(), s);
    const size_t shard = static_cast<size_t>(it - (store.sample_base.begin() + 1));
    return {&store.shards[shard], s - store.sample_base[shard]};
}

}  // namespace

BatchStats fill_batch(const TokenStore& store, const BatchPlan& plan, int32_t pad_id, const BatchOut& out) {
    const int64_t L = out.seq_len;
    if (L < 1) fail("fill_batch: seq_len must be >= 1");
    if (plan.num_rows * L > INT32_MAX) {
        fail("fill_batch: a batch of " + std::to_string(plan.num_rows) + " x " + std::to_string(L) +
             " tokens overflows int32 cu_seqlens; use fewer rows per micro-batch");
    }
    BatchStats stats{0, 0, 0};
    if (out.cu_capacity < 1) fail("fill_batch: cu_seqlens needs room for at least one entry");
    out.cu_seqlens[0] = 0;

    auto push_segment = [&](int64_t end, int64_t length) {
        if (stats.num_segments + 1 >= out.cu_capacity) {
            fail("fill_batch: cu_seqlens buffer too small (" + std::to_string(out.cu_capacity) + " entries)");
        }
        out.cu_seqlens[++stats.num_segments] = static_cast<int32_t>(end);
        stats.max_seqlen = std::max(stats.max_seqlen, length);
    };

    for (int64_t r = 0; r < plan.num_rows; ++r) {
        const int64_t base = r * L;
        int64_t pos = 0;
        const auto range = row_range(plan, r);
        for (int64_t k = range.first; k < range.second; ++k) {
            const auto [shard, s] = sample_checked(store, plan, k);
            const int64_t begin = shard->offsets[s];
            const int64_t n = shard->offsets[s + 1] - begin;
            if (n == 0) continue;  // no tokens, no segment
            if (pos + n > L) {
                fail("fill_batch: row " + std::to_string(r) + " holds more than seq_len = " + std::to_string(L) +
                     " tokens (sample " + std::to_string(plan.bin_samples[k]) + " does not fit)");
            }
            const int64_t kind = shard->kinds[s];
            if (kind >= store.num_kinds) {
                fail("fill_batch: sample " + std::to_string(plan.bin_samples[k]) + " has kind id " +
                     std::to_string(kind) + " but only " + std::to_string(store.num_kinds) +
                     " kind weights were given");
            }
            const float weight = store.kind_weights[kind];
            const int64_t domain = shard->domains[s];
            const int32_t* tok = shard->tokens + begin;
            const uint8_t* mask = shard->loss_mask + begin;
            const int64_t at = base + pos;
            int64_t* ids = out.input_ids + at;
            int64_t* labels = out.labels + at;
            int64_t* positions = out.position_ids + at;
            int64_t* kinds = out.kind_ids + at;
            int64_t* domains = out.domain_ids + at;
            float* weights = out.loss_weights + at;
            // Separate branch-free loops so that each one vectorises.
            for (int64_t j = 0; j < n; ++j) ids[j] = tok[j];
            for (int64_t j = 0; j < n; ++j) labels[j] = mask[j] ? int64_t{tok[j]} : kIgnoreIndex;
            for (int64_t j = 0; j < n; ++j) weights[j] = mask[j] ? weight : 0.0f;
            for (int64_t j = 0; j < n; ++j) positions[j] = j;
            std::fill(kinds, kinds + n, kind);
            std::fill(domains, domains + n, domain);
            // Nothing before a document's first token may predict it.
            labels[0] = kIgnoreIndex;
            weights[0] = 0.0f;
            pos += n;
            stats.num_real_tokens += n;
            push_segment(at + n, n);
        }
        if (pos < L) {
            const int64_t at = base + pos;
            const int64_t n = L - pos;
            std::fill(out.input_ids + at, out.input_ids + at + n, int64_t{pad_id});
            std::fill(out.labels + at, out.labels + at + n, kIgnoreIndex);
            std::fill(out.kind_ids + at, out.kind_ids + at + n, int64_t{-1});
            std::fill(out.domain_ids + at, out.domain_ids + at + n, int64_t{-1});
            std::fill(out.loss_weights + at, out.loss_weights + at + n, 0.0f);
            int64_t* positions = out.position_ids + at;
            for (int64_t j = 0; j < n; ++j) positions[j] = j;
            push_segment(at + n, n);
        }
    }
    return stats;
}

}  // namespace rega
