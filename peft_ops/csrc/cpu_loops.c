/* The CPU path's two elementwise loops that PyTorch can only run as many passes over memory:
 * the dropout keep mask (Philox4x32-10, about a hundred int64 passes a counter in torch) and the
 * NF4 decode (a gather, a multiply and a cast). Each computes exactly what its PyTorch twin
 * computes (`peft_ops.ops.dropout_keep`, `peft_ops.nf4.decode_rows`), bit for bit; the twins stay
 * the reference and the fallback. `peft_ops._cpu_loops` builds this file with the machine's C
 * compiler at first use (-O3 -march=native: the instructions this CPU has) and calls it through
 * ctypes, in pieces of rows or blocks that threads take in turn. Plain C99 (with an AVX2 path
 * where the compiler targets it), no Python or torch headers. */

#include <stdint.h>
#include <string.h>

#define ROUND_A 0xD2511F53u
#define ROUND_B 0xCD9E8D57u
#define KEY_A 0x9E3779B9u
#define KEY_B 0xBB67AE85u

/* Counters a pass of the keep loop takes (its packed decisions stay in L1), and counters a round
 * advances together: several vectors of lanes, so that the rounds' multiply chains overlap. */
#define GROUPS_A_PASS 256
#define LANES 32

/* The four keep bytes (0 / 1) of a counter as one word, byte j (the element 4g + j) first in memory. */
static inline uint32_t keep_bytes(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, uint32_t threshold)
{
    const uint32_t b0 = (w0 >> 8) >= threshold, b1 = (w1 >> 8) >= threshold,
                   b2 = (w2 >> 8) >= threshold, b3 = (w3 >> 8) >= threshold;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return b0 << 24 | b1 << 16 | b2 << 8 | b3;
#else
    return b0 | b1 << 8 | b2 << 16 | b3 << 24;
#endif
}

/* keep[m][k] for rows m in [row0, row1) of an [M, K] input, row-major, one byte (0 / 1) an element,
 * written from out (row row0 first): word k % 4 of Philox4x32-10 keyed by (k0, k1) at the counter
 * (k / 4, m, 0, 0), kept when that word >> 8 is at least `threshold` (Triton's `randint4x`). */
void peft_ops_dropout_keep(uint32_t k0, uint32_t k1, int64_t row0, int64_t row1, int64_t K,
                           uint32_t threshold, uint8_t *out)
{
    const int64_t groups = (K + 3) / 4;
    uint32_t key0[10], key1[10];
    for (int i = 0; i < 10; i++) {
        key0[i] = k0 + (uint32_t)i * KEY_A;   /* (uint32 arithmetic wraps: the keys' schedule) */
        key1[i] = k1 + (uint32_t)i * KEY_B;
    }
    uint32_t packed[GROUPS_A_PASS];
    for (int64_t m = row0; m < row1; m++) {
        uint8_t *row = out + (m - row0) * K;
        for (int64_t g0 = 0; g0 < groups; g0 += GROUPS_A_PASS) {
            const int n = (int)(groups - g0 < GROUPS_A_PASS ? groups - g0 : GROUPS_A_PASS);
            for (int l0 = 0; l0 < n; l0 += LANES) {
                uint32_t c0[LANES], c1[LANES], c2[LANES], c3[LANES];
                for (int l = 0; l < LANES; l++) {
                    c0[l] = (uint32_t)(g0 + l0 + l);
                    c1[l] = (uint32_t)m;
                    c2[l] = c3[l] = 0;
                }
                for (int i = 0; i < 10; i++) {
                    /* one Philox round, a lane a counter: this loop vectorizes */
                    for (int l = 0; l < LANES; l++) {
                        const uint64_t pa = (uint64_t)ROUND_A * c0[l], pb = (uint64_t)ROUND_B * c2[l];
                        c0[l] = (uint32_t)(pb >> 32) ^ c1[l] ^ key0[i];
                        c2[l] = (uint32_t)(pa >> 32) ^ c3[l] ^ key1[i];
                        c1[l] = (uint32_t)pb;
                        c3[l] = (uint32_t)pa;
                    }
                }
                for (int l = 0; l < LANES; l++)
                    packed[l0 + l] = keep_bytes(c0[l], c1[l], c2[l], c3[l], threshold);
            }
            const int64_t first = 4 * g0, bytes = (4 * (g0 + n) < K ? 4 * (g0 + n) : K) - first;
            memcpy(row + first, packed, (size_t)bytes);   /* (the last group of a row may be partial) */
        }
    }
}

/* Round-to-nearest-even fp32 -> bf16, NaN to the quiet NaN 0x7FC0: c10::BFloat16's conversion. */
static inline uint16_t bf16_bits(float value)
{
    uint32_t u;
    memcpy(&u, &value, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)
        return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#if defined(__AVX2__)
#include <immintrin.h>

/* 16 bytes (32 elements) of codes as 32 table indices in element order: high nibble first. */
static inline __m256i nibbles_in_order(const uint8_t *bytes)
{
    const __m128i b = _mm_loadu_si128((const __m128i *)bytes), low4 = _mm_set1_epi8(0x0F);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(b, 4), low4), low = _mm_and_si128(b, low4);
    return _mm256_set_m128i(_mm_unpackhi_epi8(high, low), _mm_unpacklo_epi8(high, low));
}

/* bf16_bits on eight lanes, in the low half of each 32-bit lane. */
static inline __m256i bf16_bits8(__m256 value)
{
    const __m256i u = _mm256_castps_si256(value);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                           _mm256_set1_epi32(0x7F800000));
    const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                          _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}
#endif

/* Elements [lo, hi) of one block (lo even), scalar: the tails the vector loops leave. */
static void decode_f32_scalar(const uint8_t *bytes, const float *table, int64_t count, float *dest)
{
    for (int64_t i = 0; i < count / 2; i++) {
        dest[2 * i] = table[bytes[i] >> 4];
        dest[2 * i + 1] = table[bytes[i] & 15];
    }
    if (count & 1)   /* the tensor's odd last element */
        dest[count - 1] = table[bytes[count / 2] >> 4];
}

static void decode_bf16_scalar(const uint8_t *bytes, const uint16_t *table, int64_t count, uint16_t *dest)
{
    for (int64_t i = 0; i < count / 2; i++) {
        dest[2 * i] = table[bytes[i] >> 4];
        dest[2 * i + 1] = table[bytes[i] & 15];
    }
    if (count & 1)
        dest[count - 1] = table[bytes[count / 2] >> 4];
}

static inline float widened(uint16_t bf16)
{
    const uint32_t u = (uint32_t)bf16 << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Elements [start, stop) of an NF4 weight (start is a block's first element, so even), each
 * code[nibble] * absmax[its block] in fp32, stored from out as fp32; with `round_bf16`, rounded
 * once to bf16 first (stored widened: the exact value a bf16 decode converted to fp32 holds).
 * Each block's sixteen products are formed once: the same fp32 multiply. */
void peft_ops_nf4_decode_f32(const uint8_t *packed, const float *absmax, const float *code,
                             int64_t blocksize, int64_t start, int64_t stop, int round_bf16, float *out)
{
    for (int64_t lo = start; lo < stop; ) {
        const int64_t block = lo / blocksize;
        const int64_t hi = (block + 1) * blocksize < stop ? (block + 1) * blocksize : stop;
        const uint8_t *bytes = packed + lo / 2;
        float *dest = out + (lo - start);
        float table[16];
        int64_t done = 0;
#if defined(__AVX2__)
        const __m256 scale = _mm256_set1_ps(absmax[block]);
        __m256 first8 = _mm256_mul_ps(_mm256_loadu_ps(code), scale);
        __m256 second8 = _mm256_mul_ps(_mm256_loadu_ps(code + 8), scale);
        if (round_bf16) {
            first8 = _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(first8), 16));
            second8 = _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(second8), 16));
        }
        _mm256_storeu_ps(table, first8);
        _mm256_storeu_ps(table + 8, second8);
        /* sixteen-entry lookups as two eight-entry permutes, picked by the index's bit 3 */
        for (; done + 32 <= hi - lo; done += 32) {
            const __m256i index = nibbles_in_order(bytes + done / 2);
            const __m128i halves[2] = {_mm256_castsi256_si128(index), _mm256_extracti128_si256(index, 1)};
            for (int q = 0; q < 4; q++) {
                const __m256i i8 = _mm256_cvtepu8_epi32(q & 1 ? _mm_srli_si128(halves[q / 2], 8) : halves[q / 2]);
                const __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(i8, 28));   /* bit 3 to the sign */
                const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(first8, i8),
                                                  _mm256_permutevar8x32_ps(second8, i8), pick);
                _mm256_storeu_ps(dest + done + 8 * q, v);
            }
        }
#else
        for (int j = 0; j < 16; j++) {
            table[j] = code[j] * absmax[block];
            if (round_bf16)
                table[j] = widened(bf16_bits(table[j]));
        }
#endif
        decode_f32_scalar(bytes + done / 2, table, hi - lo - done, dest + done);
        lo = hi;
    }
}

/* The same rounded once to bf16, stored as bf16 (out is uint16 words). */
void peft_ops_nf4_decode_bf16(const uint8_t *packed, const float *absmax, const float *code,
                              int64_t blocksize, int64_t start, int64_t stop, uint16_t *out)
{
    for (int64_t lo = start; lo < stop; ) {
        const int64_t block = lo / blocksize;
        const int64_t hi = (block + 1) * blocksize < stop ? (block + 1) * blocksize : stop;
        const uint8_t *bytes = packed + lo / 2;
        uint16_t *dest = out + (lo - start);
        uint16_t table[16];   /* the bf16 bits of the block's sixteen products */
        int64_t done = 0;
#if defined(__AVX2__)
        const __m256 scale = _mm256_set1_ps(absmax[block]);
        /* sixteen words in order (packus interleaves the lanes; the permute puts them back) */
        const __m256i words = _mm256_permute4x64_epi64(
            _mm256_packus_epi32(bf16_bits8(_mm256_mul_ps(_mm256_loadu_ps(code), scale)),
                                bf16_bits8(_mm256_mul_ps(_mm256_loadu_ps(code + 8), scale))), 0xD8);
        _mm256_storeu_si256((__m256i *)table, words);
        /* byte lookups: the values' low bytes and high bytes, each a sixteen-byte table */
        const __m256i split = _mm256_shuffle_epi8(words, _mm256_setr_epi8(
            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
        const __m128i lane0 = _mm256_castsi256_si128(split), lane1 = _mm256_extracti128_si256(split, 1);
        const __m256i tl = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(lane0, lane1));
        const __m256i th = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(lane0, lane1));
        for (; done + 32 <= hi - lo; done += 32) {
            const __m256i index = nibbles_in_order(bytes + done / 2);
            const __m256i vl = _mm256_shuffle_epi8(tl, index), vh = _mm256_shuffle_epi8(th, index);
            /* per 128-bit lane: elements 0-7 | 16-23 and 8-15 | 24-31 */
            const __m256i a = _mm256_unpacklo_epi8(vl, vh), b = _mm256_unpackhi_epi8(vl, vh);
            _mm256_storeu_si256((__m256i *)(dest + done), _mm256_permute2x128_si256(a, b, 0x20));
            _mm256_storeu_si256((__m256i *)(dest + done + 16), _mm256_permute2x128_si256(a, b, 0x31));
        }
#else
        for (int j = 0; j < 16; j++)
            table[j] = bf16_bits(code[j] * absmax[block]);
#endif
        decode_bf16_scalar(bytes + done / 2, table, hi - lo - done, dest + done);
        lo = hi;
    }
}
