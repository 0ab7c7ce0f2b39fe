// floe's attention kernel for OpenVINO's CPU plugin: heads of 32 dimensions, bf16, AVX-512 BF16.
//
// SegmentAttention(q, k, v, segments) -> out, where q, k, v and out are (rows, tokens, heads, 32)
// in f32 or bf16 (the layout the projections write, so no transposes around it) and segments is
// (rows, tokens) of integers: a token attends to the run of equal, non-zero numbers it belongs to,
// and a token numbered 0 (padding) gets zeros. A padded batch passes its attention mask (one run
// of 1s per row); a packed batch its segment numbers (1, 2, ... per input in a row).
//
// Why it exists: OpenVINO's fused attention computes every row's full square of scores whatever
// the mask says, at 25-50% of the matmul peak with 32-dimension heads on AVX-512 BF16 without AMX.
// Here each input's scores are computed over its own keys only (a packed row of 64 tokens holding
// four inputs of 16 computes 4 x 16 x 16 scores, not 64 x 64), with bf16 dot products
// (vdpbf16ps), and the softmax in float32 registers.
//
// Built by floe/engine/native/__init__.py with the compiler of the machine it runs on; the graph
// rewrite that inserts it is floe/engine/native/graph.py.

#include <immintrin.h>

#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/core/parallel.hpp>
#include <openvino/op/op.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kHead = 32;    // dimensions per head
constexpr int kTile = 8;     // queries computed together (times two key blocks: 16 dot-product chains)

// 2^t for t <= 0 (a masked key's t, about -1e30, gives 0): 2^n times a degree-3 polynomial of
// the fraction (fitted on [-0.5, 0.5]), accurate to about 1e-4 relative: the probabilities are
// rounded to bf16 (4e-3) before use. One fma fewer per 16 scores than degree 4, and no clamp.
inline __m512 exp2_nonpositive(__m512 t) {
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(5.592204e-2f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4264008e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9312103e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9992448e-1f));
    return _mm512_scalef_ps(p, n);
}

// Eight vectors reduced at once (``op``: max or add) by a transposing tree, 23 instructions
// against about 64 for eight reductions one after another, and independent of each other:
// element 4k of the result holds v[k]'s reduction and element 4k + 2 holds v[4 + k]'s (k < 4).
template <typename Op>
inline __m512 reduce8(const __m512* v, Op op) {
    __m512 x[4];
    for (int i = 0; i < 4; ++i)   // halves: blocks 0-1 of x[i] from v[2i], blocks 2-3 from v[2i+1]
        x[i] = op(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                  _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xee));
    // quarters: block k of y0 from v[k], of y1 from v[4 + k]
    const __m512 y0 = op(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xdd));
    const __m512 y1 = op(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xdd));
    const __m512 z = op(_mm512_shuffle_ps(y0, y1, _MM_SHUFFLE(1, 0, 1, 0)),
                        _mm512_shuffle_ps(y0, y1, _MM_SHUFFLE(3, 2, 3, 2)));
    return op(z, _mm512_permute_ps(z, _MM_SHUFFLE(2, 3, 0, 1)));
}
inline int reduced_at(int t) { return t < 4 ? 4 * t : 4 * (t - 4) + 2; }

// One head's 32 values of a token as 32 bf16: 16 dwords, each a pair of consecutive dimensions.
inline __m512i head_bf16(const float* x) {
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 16), _mm512_loadu_ps(x));
}
inline __m512i head_bf16(const uint16_t* x) { return _mm512_loadu_si512(x); }
inline __m512i head_bf16_scaled(const float* x, __m512 scale) {
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_loadu_ps(x + 16), scale),
                                        _mm512_mul_ps(_mm512_loadu_ps(x), scale));
}
inline __m512i head_bf16_scaled(const uint16_t* x, __m512 scale) {
    const __m512i r = _mm512_loadu_si512(x);
    const __m512 lo = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(r)), 16));
    const __m512 hi = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(r, 1)), 16));
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, scale), _mm512_mul_ps(lo, scale));
}
inline void store_head(float* o, __m512 lo, __m512 hi) {
    _mm512_storeu_ps(o, lo);
    _mm512_storeu_ps(o + 16, hi);
}
inline void store_head(uint16_t* o, __m512 lo, __m512 hi) {
    _mm512_storeu_si512(o, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}
inline void zero_head(float* o) { store_head(o, _mm512_setzero_ps(), _mm512_setzero_ps()); }
inline void zero_head(uint16_t* o) { _mm512_storeu_si512(o, _mm512_setzero_si512()); }

// r[i] holds row i of a 16 x 16 matrix of dwords; afterwards r[i] holds its column i.
inline void transpose16(__m512i* r) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 8; ++i) {   // t[0..7] from rows 0-7, t[8..15] from rows 8-15
        const int a = (i / 4) * 8 + (i % 4), b = a + 4;
        t[2 * i] = _mm512_shuffle_i32x4(r[a], r[b], 0x88);
        t[2 * i + 1] = _mm512_shuffle_i32x4(r[a], r[b], 0xdd);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm512_shuffle_i32x4(t[2 * i], t[2 * i + 8], 0x88);
        r[i + 4] = _mm512_shuffle_i32x4(t[2 * i + 1], t[2 * i + 9], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[2 * i], t[2 * i + 8], 0xdd);
        r[i + 12] = _mm512_shuffle_i32x4(t[2 * i + 1], t[2 * i + 9], 0xdd);
    }
}

// Starts bringing one input's head of q, k and v into the core's cache: issued for the next
// input while the present one is computed, so that their lines (one per token, the tokens a whole
// row of heads apart, and fresh from the projections in L3) arrive in the shadow of the compute.
// (Timed alone from a cold cache, a short input spent a third of its time on these loads.)
template <typename T>
inline void prefetch_head(const T* q, const T* k, const T* v, int n, size_t stride) {
    constexpr size_t line = 64 / sizeof(T);
    for (int j = 0; j < n; ++j) {
        const size_t at = j * stride;
        for (size_t d = 0; d < kHead; d += line) {
            _mm_prefetch(reinterpret_cast<const char*>(q + at + d), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(k + at + d), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(v + at + d), _MM_HINT_T0);
        }
    }
}

// One thread's buffers for one input, as plain pointers. The kernel reads them through this
// copy, never through the thread_local Scratch itself: a store through a vector's data could, as
// far as the compiler knows, change the vector, so each loop step reloaded the pointer, and
// reaching a thread_local in a shared library is a call (__tls_get_addr) that also spilled the
// softmax's registers to the stack around it, once per 32 scores.
struct Buffers {
    uint32_t* keys;     // [16 dimension pairs][width]: the keys, transposed
    uint32_t* values;   // [width / 2][32]: pairs of consecutive tokens' values
    float* scores;      // [kTile][width]
    uint16_t* probs;    // [kTile][width], bf16
};

struct Scratch {            // per thread, grown to the longest input seen
    std::vector<uint32_t> keys;
    std::vector<uint32_t> values;
    std::vector<float> scores;
    std::vector<uint16_t> probs;
    Buffers fit(int width) {
        if ((int)keys.size() < 16 * width) {
            keys.resize(16 * width);
            values.resize(width / 2 * kHead);
            scores.resize(kTile * width);
            probs.resize(kTile * width);
        }
        return {keys.data(), values.data(), scores.data(), probs.data()};
    }
};

// Q queries of one input from query i0 on (nq of them real: a short last tile repeats its last
// query), against all its keys and values, already laid out in the scratch by ``attend``.
template <int Q, typename T>
void attend_tile(const T* q, T* o, int i0, int nq, size_t stride, float scale, const Buffers w,
                 int width, int blocks, int last, __mmask16 last_keys, int pairs) {
    const __m512 scale_v = _mm512_set1_ps(scale);
    // a masked key's score: finite, so that its exponent is 0 and never NaN (-inf - -inf)
    const __m512 minus_inf = _mm512_set1_ps(-1e30f);
    alignas(64) uint32_t qp[Q][16];
#pragma GCC unroll 8
    for (int t = 0; t < Q; ++t) {   // a short last tile repeats its last query
        const T* row = q + (i0 + std::min(t, nq - 1)) * stride;
        _mm512_store_si512(qp[t], scale == 1.f ? head_bf16(row) : head_bf16_scaled(row, scale_v));
    }
    __m512 best[kTile];
#pragma GCC unroll 8
    for (int t = 0; t < Q; ++t) best[t] = minus_inf;
    // Blocks of keys two at a time: each query's broadcast feeds two dot products. The
    // pointer is hidden from the compiler at every step, which would otherwise hoist all
    // 128 broadcasts of a tile out of the loop into 8 KB of stack, stored and reloaded.
    for (int b = 0; b <= last; b += 2) {
        const uint32_t* qv = &qp[0][0];
        asm volatile("" : "+r"(qv));
        if (b + 1 <= last) {
            __m512 acc0[Q], acc1[Q];
#pragma GCC unroll 8
            for (int t = 0; t < Q; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
#pragma GCC unroll 16
            for (int p = 0; p < 16; ++p) {
                const __m512bh k0 = (__m512bh)_mm512_loadu_si512(&w.keys[p * width + b * 16]);
                const __m512bh k1 = (__m512bh)_mm512_loadu_si512(&w.keys[p * width + b * 16 + 16]);
#pragma GCC unroll 8
                for (int t = 0; t < Q; ++t) {
                    const __m512bh a = (__m512bh)_mm512_set1_epi32(qv[t * 16 + p]);
                    acc0[t] = _mm512_dpbf16_ps(acc0[t], a, k0);
                    acc1[t] = _mm512_dpbf16_ps(acc1[t], a, k1);
                }
            }
            const __mmask16 real = b + 1 < last ? (__mmask16)0xffff : last_keys;
#pragma GCC unroll 8
            for (int t = 0; t < Q; ++t) {
                acc1[t] = _mm512_mask_blend_ps(real, minus_inf, acc1[t]);
                best[t] = _mm512_max_ps(best[t], _mm512_max_ps(acc0[t], acc1[t]));
                _mm512_storeu_ps(&w.scores[t * width + b * 16], acc0[t]);
                _mm512_storeu_ps(&w.scores[t * width + b * 16 + 16], acc1[t]);
            }
        } else {   // the last block alone
            __m512 acc[Q];
#pragma GCC unroll 8
            for (int t = 0; t < Q; ++t) acc[t] = _mm512_setzero_ps();
#pragma GCC unroll 16
            for (int p = 0; p < 16; ++p) {
                const __m512bh kb = (__m512bh)_mm512_loadu_si512(&w.keys[p * width + b * 16]);
#pragma GCC unroll 8
                for (int t = 0; t < Q; ++t)
                    acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_set1_epi32(qv[t * 16 + p]), kb);
            }
#pragma GCC unroll 8
            for (int t = 0; t < Q; ++t) {
                acc[t] = _mm512_mask_blend_ps(last_keys, minus_inf, acc[t]);
                best[t] = _mm512_max_ps(best[t], acc[t]);
                _mm512_storeu_ps(&w.scores[t * width + b * 16], acc[t]);
            }
        }
    }
    const auto max = [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); };
    const auto add = [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); };
    alignas(64) float tops[16], sums[16];
    for (int t = Q; t < kTile; ++t) best[t] = best[t - Q];   // a half tile: its own again
    _mm512_store_ps(tops, reduce8(best, max));
    __m512 partial[kTile];   // each query's sum of exponentials, 16 lanes of it
    for (int t = 0; t < Q; ++t) {
        float* s = &w.scores[t * width];
        // e^(s - top) = 2^(s log2 e - top log2 e): one fma per 16 scores
        const __m512 log2e = _mm512_set1_ps(1.44269504f);
        const __m512 shift = _mm512_set1_ps(-tops[reduced_at(t)] * 1.44269504f);
        __m512 sum = _mm512_setzero_ps();
        int b = 0;
        for (; b + 1 < blocks; b += 2) {
            const __m512 e0 = exp2_nonpositive(
                _mm512_fmadd_ps(_mm512_loadu_ps(s + b * 16), log2e, shift));
            const __m512 e1 = exp2_nonpositive(
                _mm512_fmadd_ps(_mm512_loadu_ps(s + b * 16 + 16), log2e, shift));
            sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
            _mm512_storeu_si512(&w.probs[t * width + b * 16], (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
        }
        if (b < blocks) {   // an odd last block (an input of 16 keys or fewer is one block)
            const __m512 e0 = exp2_nonpositive(
                _mm512_fmadd_ps(_mm512_loadu_ps(s + b * 16), log2e, shift));
            sum = _mm512_add_ps(sum, e0);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(&w.probs[t * width + b * 16]),
                                (__m256i)_mm512_cvtneps_pbh(e0));
        }
        partial[t] = sum;
    }
    for (int t = Q; t < kTile; ++t) partial[t] = partial[t - Q];
    _mm512_store_ps(sums, reduce8(partial, add));
    __m512 lo[Q], hi[Q];
#pragma GCC unroll 8
    for (int t = 0; t < Q; ++t) lo[t] = hi[t] = _mm512_setzero_ps();
    const uint32_t* pp = reinterpret_cast<const uint32_t*>(w.probs);
    const int pstride = width / 2;
    for (int jp = 0; jp < pairs; ++jp) {
        const __m512bh v0 = (__m512bh)_mm512_loadu_si512(&w.values[jp * kHead]);
        const __m512bh v1 = (__m512bh)_mm512_loadu_si512(&w.values[jp * kHead + 16]);
#pragma GCC unroll 8
        for (int t = 0; t < Q; ++t) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32(pp[t * pstride + jp]);
            lo[t] = _mm512_dpbf16_ps(lo[t], a, v0);
            hi[t] = _mm512_dpbf16_ps(hi[t], a, v1);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < Q; ++t) {
        if (t < nq) {
            const __m512 inv = _mm512_set1_ps(1.f / sums[reduced_at(t)]);
            store_head(o + (i0 + t) * stride, _mm512_mul_ps(lo[t], inv), _mm512_mul_ps(hi[t], inv));
        }
    }
}

// One input (length n) of one head: q, k, v, o point at its first token, rows `stride` apart.
template <typename T>
void attend(const T* q, const T* k, const T* v, T* o, int n, size_t stride, float scale,
            Scratch& scratch) {
    const int width = (n + 15) / 16 * 16;    // keys in whole 16-key blocks
    const int blocks = width / 16;
    const Buffers w = scratch.fit(width);
    for (int b = 0; b < blocks; ++b) {
        __m512i rows[16];
        for (int t = 0; t < 16; ++t) {
            const int j = b * 16 + t;
            rows[t] = j < n ? head_bf16(k + j * stride) : _mm512_setzero_si512();
        }
        transpose16(rows);
        for (int p = 0; p < 16; ++p) _mm512_storeu_si512(&w.keys[p * width + b * 16], rows[p]);
    }
    // values: for each pair of tokens (j, j+1) and dimension d, the dword (v[j][d], v[j+1][d])
    const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
    const int pairs = (n + 1) / 2;
    for (int jp = 0; jp < pairs; ++jp) {
        const int j = 2 * jp;
        const __m512i a = head_bf16(v + j * stride);
        const __m512i b = j + 1 < n ? head_bf16(v + (j + 1) * stride) : _mm512_setzero_si512();
        _mm512_storeu_si512(&w.values[jp * kHead], _mm512_permutex2var_epi16(a, low, b));
        _mm512_storeu_si512(&w.values[jp * kHead + 16], _mm512_permutex2var_epi16(a, high, b));
    }
    const int last = (n - 1) / 16;  // the block holding the last key
    const __mmask16 last_keys = n % 16 == 0 ? (__mmask16)0xffff : (__mmask16)((1u << (n % 16)) - 1u);
    for (int i0 = 0; i0 < n; i0 += kTile) {
        const int nq = std::min(kTile, n - i0);
        if (nq <= 4)   // half a tile (an input's last few queries): half the work
            attend_tile<4>(q, o, i0, nq, stride, scale, w, width, blocks, last, last_keys, pairs);
        else
            attend_tile<kTile>(q, o, i0, nq, stride, scale, w, width, blocks, last, last_keys, pairs);
    }
}

struct Run {   // one input: a run of equal, non-zero segment numbers in a row
    size_t start;   // first token, counted over the whole batch
    int length;
};

template <typename S>
std::vector<Run> runs_of(const S* segments, size_t rows, size_t tokens, std::vector<Run>& padding) {
    std::vector<Run> runs;
    for (size_t r = 0; r < rows; ++r) {
        const S* row = segments + r * tokens;
        size_t a = 0;
        while (a < tokens) {
            size_t b = a + 1;
            while (b < tokens && row[b] == row[a]) ++b;
            (row[a] == 0 ? padding : runs).push_back({r * tokens + a, int(b - a)});
            a = b;
        }
    }
    return runs;
}

template <typename T>
void attend_all(const T* q, const T* k, const T* v, T* o, const std::vector<Run>& runs,
                const std::vector<Run>& padding, size_t heads, float scale) {
    const size_t stride = heads * kHead;
    for (const Run& p : padding)
        for (int j = 0; j < p.length; ++j)
            for (size_t h = 0; h < heads; ++h) zero_head(o + (p.start + j) * stride + h * kHead);
    const size_t items = runs.size() * heads;
    ov::parallel_for(items, [&](size_t item) {
        static thread_local Scratch scratch;
        if (item + 1 < items) {   // a thread's items are consecutive: the next is likely its own
            const Run& next = runs[(item + 1) / heads];
            const size_t at = next.start * stride + ((item + 1) % heads) * kHead;
            prefetch_head(q + at, k + at, v + at, next.length, stride);
        }
        const Run& r = runs[item / heads];
        const size_t at = r.start * stride + (item % heads) * kHead;
        attend(q + at, k + at, v + at, o + at, r.length, stride, scale, scratch);
    });
}

}  // namespace

class SegmentAttention : public ov::op::Op {
public:
    OPENVINO_OP("SegmentAttention", "floe");

    SegmentAttention() = default;
    SegmentAttention(const ov::OutputVector& args, float scale) : Op(args), m_scale(scale) {
        constructor_validate_and_infer_types();
    }
    void validate_and_infer_types() override {
        const auto& q = get_input_partial_shape(0);
        OPENVINO_ASSERT(q.rank().is_dynamic() || (q.rank().get_length() == 4 &&
                        (q[3].is_dynamic() || q[3].get_length() == kHead)),
                        "SegmentAttention takes (rows, tokens, heads, 32) inputs");
        set_output_type(0, get_input_element_type(0), q);
    }
    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
        return std::make_shared<SegmentAttention>(args, m_scale);
    }
    bool visit_attributes(ov::AttributeVisitor& visitor) override {
        visitor.on_attribute("scale", m_scale);
        return true;
    }
    bool has_evaluate() const override { return true; }
    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
        const ov::Shape shape = inputs[0].get_shape();
        outputs[0].set_shape(shape);
        const size_t rows = shape[0], tokens = shape[1], heads = shape[2];
        std::vector<Run> padding;
        const ov::Tensor& seg = inputs[3];
        // (the CPU plugin runs integer inputs as i32; i64 where another runtime keeps them)
        const std::vector<Run> runs =
            seg.get_element_type() == ov::element::i64
                ? runs_of(static_cast<const int64_t*>(seg.data()), rows, tokens, padding)
                : runs_of(static_cast<const int32_t*>(seg.data()), rows, tokens, padding);
        const ov::element::Type type = inputs[0].get_element_type();
        if (type == ov::element::f32) {
            attend_all(static_cast<const float*>(inputs[0].data()),
                       static_cast<const float*>(inputs[1].data()),
                       static_cast<const float*>(inputs[2].data()),
                       static_cast<float*>(outputs[0].data()), runs, padding, heads, m_scale);
        } else if (type == ov::element::bf16) {
            attend_all(static_cast<const uint16_t*>(inputs[0].data()),
                       static_cast<const uint16_t*>(inputs[1].data()),
                       static_cast<const uint16_t*>(inputs[2].data()),
                       static_cast<uint16_t*>(outputs[0].data()), runs, padding, heads, m_scale);
        } else {
            return false;
        }
        return true;
    }

private:
    float m_scale = 1.f;
};

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>(
    {std::make_shared<ov::OpExtension<SegmentAttention>>()}));
