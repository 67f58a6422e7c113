/* A standalone edgeq frame encoder (wire format v1, docs/wire-format.md), libc only.
 *
 * Writes one 28x28 uint8 frame to a file that `mosquitto_pub -f` can publish.
 * Every integer is written byte by byte, little-endian, so the output does not
 * depend on the host's byte order or on struct layout.
 *
 * Usage: encode_frame OUT DEVICE_ID SEQ LABEL PIXELS
 *   OUT        output file path
 *   DEVICE_ID  1..64 ASCII characters from [A-Za-z0-9_.-]
 *   SEQ        sequence number, 0..2^64-1 (decimal)
 *   LABEL      class 0..65535, or -1 for "no label"
 *   PIXELS     file of exactly 784 raw uint8 bytes (row-major), or "-" for the
 *              built-in pattern pixel[r][c] = (r * 31 + c * 7) % 256
 *
 * Build: gcc -std=c99 -Wall -Wextra -O2 -o encode_frame encode_frame.c
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ROWS 28
#define COLS 28
#define NPIX (ROWS * COLS)
#define HEADER_SIZE 32
#define NDIM 2
#define MAX_ID_LEN 64
#define DTYPE_UINT8 1
#define FLAG_HAS_LABEL 0x01

static void put_u8(unsigned char *p, unsigned v) { p[0] = (unsigned char)(v & 0xFFu); }

static void put_u16le(unsigned char *p, uint16_t v) {
    p[0] = (unsigned char)(v & 0xFFu);
    p[1] = (unsigned char)((v >> 8) & 0xFFu);
}

static void put_u32le(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)((v >> (8 * i)) & 0xFFu);
}

static void put_u64le(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)((v >> (8 * i)) & 0xFFu);
}

static int fail(const char *fmt, const char *arg) {
    fprintf(stderr, "encode_frame: ");
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    return 1;
}

static int valid_device_id(const char *id, size_t len) {
    if (len < 1 || len > MAX_ID_LEN) return 0;
    for (size_t i = 0; i < len; i++) {
        char c = id[i];
        int ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                 c == '_' || c == '.' || c == '-';
        if (!ok) return 0;
    }
    return 1;
}

/* Parse a decimal uint64 with no sign, no spaces, no trailing text. */
static int parse_u64(const char *s, uint64_t *out) {
    if (*s < '0' || *s > '9') return 0;
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0') return 0;
    *out = (uint64_t)v;
    return 1;
}

/* Read exactly NPIX bytes; any other size is an error. */
static int read_pixels(const char *path, unsigned char *pixels) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "encode_frame: cannot open pixel file %s: %s\n", path, strerror(errno));
        return 1;
    }
    size_t got = fread(pixels, 1, NPIX, f);
    int extra = fgetc(f);
    int err = ferror(f);
    fclose(f);
    if (err) return fail("error reading pixel file %s", path);
    if (got != NPIX || extra != EOF) {
        fprintf(stderr, "encode_frame: pixel file %s must hold exactly %d bytes (%s)\n", path, NPIX,
                got != NPIX ? "too short" : "too long");
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s OUT DEVICE_ID SEQ LABEL(-1 = none) PIXELS(784-byte file or -)\n",
                argc > 0 ? argv[0] : "encode_frame");
        return 2;
    }
    const char *out_path = argv[1], *device_id = argv[2], *pix_path = argv[5];

    size_t id_len = strlen(device_id);
    if (!valid_device_id(device_id, id_len))
        return fail("device id %s must be 1..64 characters from [A-Za-z0-9_.-]", device_id);

    uint64_t seq;
    if (!parse_u64(argv[3], &seq)) return fail("seq %s is not a decimal integer in 0..2^64-1", argv[3]);

    unsigned flags = 0;
    uint16_t label = 0;
    if (strcmp(argv[4], "-1") != 0) {
        uint64_t v;
        if (!parse_u64(argv[4], &v) || v > 0xFFFFu)
            return fail("label %s must be -1 or an integer in 0..65535", argv[4]);
        label = (uint16_t)v;
        flags |= FLAG_HAS_LABEL;
    }

    unsigned char pixels[NPIX];
    if (strcmp(pix_path, "-") == 0) {
        for (int r = 0; r < ROWS; r++)
            for (int c = 0; c < COLS; c++) pixels[r * COLS + c] = (unsigned char)((r * 31 + c * 7) % 256);
    } else if (read_pixels(pix_path, pixels) != 0) {
        return 1;
    }

    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return fail("clock_gettime failed: %s", strerror(errno));
    int64_t capture_ns = (int64_t)ts.tv_sec * 1000000000LL + (int64_t)ts.tv_nsec;

    /* header (32) + shape (4 * NDIM) + device id + payload */
    unsigned char frame[HEADER_SIZE + 4 * NDIM + MAX_ID_LEN + NPIX];
    unsigned char *p = frame;
    memcpy(p, "EQFR", 4);                    /* 0: magic */
    put_u8(p + 4, 1);                        /* 4: version */
    put_u8(p + 5, DTYPE_UINT8);              /* 5: dtype code */
    put_u8(p + 6, NDIM);                     /* 6: ndim */
    put_u8(p + 7, flags);                    /* 7: flags */
    put_u16le(p + 8, label);                 /* 8: label */
    put_u8(p + 10, (unsigned)id_len);        /* 10: device id length */
    put_u8(p + 11, 0);                       /* 11: reserved */
    put_u32le(p + 12, NPIX);                 /* 12: payload length (784 x 1 byte) */
    put_u64le(p + 16, seq);                  /* 16: sequence number */
    put_u64le(p + 24, (uint64_t)capture_ns); /* 24: capture time, two's complement int64 */
    p += HEADER_SIZE;
    put_u32le(p, ROWS);
    put_u32le(p + 4, COLS);
    p += 4 * NDIM;
    memcpy(p, device_id, id_len);
    p += id_len;
    memcpy(p, pixels, NPIX);
    p += NPIX;
    size_t total = (size_t)(p - frame);

    FILE *out = fopen(out_path, "wb");
    if (!out) {
        fprintf(stderr, "encode_frame: cannot create output file %s: %s\n", out_path, strerror(errno));
        return 1;
    }
    size_t written = fwrite(frame, 1, total, out);
    if (fclose(out) != 0 || written != total) {
        remove(out_path);
        return fail("error writing output file %s", out_path);
    }
    return 0;
}
