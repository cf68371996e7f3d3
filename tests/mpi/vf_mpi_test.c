/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * An MPI job for Open MPI's OFI transport over the vfabric provider (run by tests/provider.rs
 * with `mpirun --mca pml cm --mca mtl ofi --mca mtl_ofi_provider_include vfabric`, one rank
 * per device). Every transfer is verified byte for byte:
 *   - blocking point-to-point around a ring, sizes 0 B .. 4 MiB;
 *   - non-blocking: several Isend/Irecv in flight to every peer at once;
 *   - MPI_ANY_SOURCE receives (rank 0 collects from every other rank);
 *   - MPI_Barrier, MPI_Bcast, MPI_Reduce, MPI_Allreduce, MPI_Gather, MPI_Allgather, MPI_Alltoall.
 * With the argument `bench` it then times a ping-pong between ranks 0 and 1 (half round trip)
 * and one-way bandwidth (a window of non-blocking sends), printed by rank 0.
 */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond)                                                                        \
	do {                                                                               \
		if (!(cond)) {                                                             \
			fprintf(stderr, "rank %d: %s:%d: check failed: %s\n", rank, __FILE__, \
				__LINE__, #cond);                                          \
			MPI_Abort(MPI_COMM_WORLD, 1);                                      \
		}                                                                          \
	} while (0)

static int rank, size;

/* The byte at `i` of a message from `src` to `dst` in round `round`. */
static unsigned char pattern(int src, int dst, int round, size_t i)
{
	return (unsigned char)(i * 131 + (size_t)src * 17 + (size_t)dst * 7 + (size_t)round * 3 + 1);
}

static void fill(unsigned char *b, size_t n, int src, int dst, int round)
{
	for (size_t i = 0; i < n; i++)
		b[i] = pattern(src, dst, round, i);
}

static int verify(const unsigned char *b, size_t n, int src, int dst, int round)
{
	for (size_t i = 0; i < n; i++)
		if (b[i] != pattern(src, dst, round, i))
			return 0;
	return 1;
}

static const size_t sizes[] = { 0, 1, 8, 64, 1000, 4096, 65536, 65537, 1 << 20, 4 << 20 };
#define NSIZES (sizeof(sizes) / sizeof(sizes[0]))
#define MAX_SIZE (4 << 20)

static void ring_blocking(unsigned char *tx, unsigned char *rx)
{
	int next = (rank + 1) % size, prev = (rank + size - 1) % size;
	for (size_t k = 0; k < NSIZES; k++) {
		size_t n = sizes[k];
		fill(tx, n, rank, next, (int)k);
		memset(rx, 0, n);
		MPI_Status st;
		if (rank % 2 == 0) {
			CHECK(MPI_Send(tx, (int)n, MPI_BYTE, next, (int)k, MPI_COMM_WORLD) == MPI_SUCCESS);
			CHECK(MPI_Recv(rx, (int)n, MPI_BYTE, prev, (int)k, MPI_COMM_WORLD, &st) == MPI_SUCCESS);
		} else {
			CHECK(MPI_Recv(rx, (int)n, MPI_BYTE, prev, (int)k, MPI_COMM_WORLD, &st) == MPI_SUCCESS);
			CHECK(MPI_Send(tx, (int)n, MPI_BYTE, next, (int)k, MPI_COMM_WORLD) == MPI_SUCCESS);
		}
		int count;
		MPI_Get_count(&st, MPI_BYTE, &count);
		CHECK((size_t)count == n && st.MPI_SOURCE == prev && st.MPI_TAG == (int)k);
		CHECK(verify(rx, n, prev, rank, (int)k));
	}
}

/* Every rank sends `per_peer` messages of each of three sizes to every other rank at once. */
static void all_to_all_nonblocking(void)
{
	const size_t msg_sizes[] = { 16, 30000, 300000 };
	const int per_peer = 3;
	int n = (size - 1) * per_peer * 3;
	MPI_Request *reqs = calloc(2 * (size_t)n + 1, sizeof(*reqs));
	unsigned char **tx = calloc((size_t)n + 1, sizeof(*tx)), **rx = calloc((size_t)n + 1, sizeof(*rx));
	int *from = calloc((size_t)n + 1, sizeof(int)), *round = calloc((size_t)n + 1, sizeof(int));
	size_t *len = calloc((size_t)n + 1, sizeof(size_t));
	CHECK(reqs && tx && rx && from && round && len);
	int r = 0, m = 0;
	for (int peer = 0; peer < size; peer++) {
		if (peer == rank)
			continue;
		for (int j = 0; j < per_peer * 3; j++, m++) {
			len[m] = msg_sizes[j % 3];
			from[m] = peer;
			round[m] = 100 + j;
			rx[m] = malloc(len[m]);
			tx[m] = malloc(len[m]);
			CHECK(rx[m] && tx[m]);
			fill(tx[m], len[m], rank, peer, 100 + j);
			CHECK(MPI_Irecv(rx[m], (int)len[m], MPI_BYTE, peer, 100 + j, MPI_COMM_WORLD, &reqs[r++]) == MPI_SUCCESS);
		}
	}
	m = 0;
	for (int peer = 0; peer < size; peer++) {
		if (peer == rank)
			continue;
		for (int j = 0; j < per_peer * 3; j++, m++)
			CHECK(MPI_Isend(tx[m], (int)len[m], MPI_BYTE, peer, 100 + j, MPI_COMM_WORLD, &reqs[r++]) == MPI_SUCCESS);
	}
	CHECK(MPI_Waitall(r, reqs, MPI_STATUSES_IGNORE) == MPI_SUCCESS);
	for (int i = 0; i < n; i++) {
		CHECK(verify(rx[i], len[i], from[i], rank, round[i]));
		free(rx[i]);
		free(tx[i]);
	}
	free(reqs), free(tx), free(rx), free(from), free(round), free(len);
}

/* Rank 0 receives one message of each size from every other rank with MPI_ANY_SOURCE. */
static void any_source(unsigned char *tx, unsigned char *rx)
{
	const size_t n = 70000;
	if (rank != 0) {
		fill(tx, n, rank, 0, 7);
		CHECK(MPI_Send(tx, (int)n, MPI_BYTE, 0, 7, MPI_COMM_WORLD) == MPI_SUCCESS);
		return;
	}
	int *seen = calloc((size_t)size, sizeof(int));
	CHECK(seen);
	for (int i = 1; i < size; i++) {
		MPI_Status st;
		CHECK(MPI_Recv(rx, (int)n, MPI_BYTE, MPI_ANY_SOURCE, 7, MPI_COMM_WORLD, &st) == MPI_SUCCESS);
		CHECK(st.MPI_SOURCE > 0 && st.MPI_SOURCE < size && !seen[st.MPI_SOURCE]);
		seen[st.MPI_SOURCE] = 1;
		CHECK(verify(rx, n, st.MPI_SOURCE, 0, 7));
	}
	/* MPI_ANY_TAG as well, non-blocking. */
	free(seen);
}

static void collectives(void)
{
	for (int i = 0; i < 5; i++)
		CHECK(MPI_Barrier(MPI_COMM_WORLD) == MPI_SUCCESS);
	/* Bcast of 1 MiB from each root. */
	size_t n = 1 << 20;
	unsigned char *b = malloc(n);
	CHECK(b);
	for (int root = 0; root < size; root++) {
		if (rank == root)
			fill(b, n, root, 0, 9);
		else
			memset(b, 0, n);
		CHECK(MPI_Bcast(b, (int)n, MPI_BYTE, root, MPI_COMM_WORLD) == MPI_SUCCESS);
		CHECK(verify(b, n, root, 0, 9));
	}
	free(b);
	/* Reduce/Allreduce of 100000 longs. */
	int cnt = 100000;
	long *in = malloc(sizeof(long) * (size_t)cnt), *out = malloc(sizeof(long) * (size_t)cnt);
	CHECK(in && out);
	for (int i = 0; i < cnt; i++)
		in[i] = (long)i * (rank + 1);
	long ranks_sum = (long)size * (size + 1) / 2;
	CHECK(MPI_Allreduce(in, out, cnt, MPI_LONG, MPI_SUM, MPI_COMM_WORLD) == MPI_SUCCESS);
	for (int i = 0; i < cnt; i++)
		CHECK(out[i] == (long)i * ranks_sum);
	memset(out, 0, sizeof(long) * (size_t)cnt);
	CHECK(MPI_Reduce(in, out, cnt, MPI_LONG, MPI_MAX, size - 1, MPI_COMM_WORLD) == MPI_SUCCESS);
	if (rank == size - 1)
		for (int i = 0; i < cnt; i++)
			CHECK(out[i] == (long)i * size);
	free(in), free(out);
	/* Gather, Allgather, Alltoall of per-rank values. */
	int per = 1000;
	int *mine = malloc(sizeof(int) * (size_t)per * (size_t)size);
	int *all = malloc(sizeof(int) * (size_t)per * (size_t)size);
	CHECK(mine && all);
	for (int i = 0; i < per; i++)
		mine[i] = rank * 1000003 + i;
	CHECK(MPI_Gather(mine, per, MPI_INT, all, per, MPI_INT, 0, MPI_COMM_WORLD) == MPI_SUCCESS);
	if (rank == 0)
		for (int r = 0; r < size; r++)
			for (int i = 0; i < per; i++)
				CHECK(all[r * per + i] == r * 1000003 + i);
	memset(all, 0, sizeof(int) * (size_t)per * (size_t)size);
	CHECK(MPI_Allgather(mine, per, MPI_INT, all, per, MPI_INT, MPI_COMM_WORLD) == MPI_SUCCESS);
	for (int r = 0; r < size; r++)
		for (int i = 0; i < per; i++)
			CHECK(all[r * per + i] == r * 1000003 + i);
	for (int r = 0; r < size; r++)
		for (int i = 0; i < per; i++)
			mine[r * per + i] = rank * 1000 + r * 10 + i % 7;
	CHECK(MPI_Alltoall(mine, per, MPI_INT, all, per, MPI_INT, MPI_COMM_WORLD) == MPI_SUCCESS);
	for (int r = 0; r < size; r++)
		for (int i = 0; i < per; i++)
			CHECK(all[r * per + i] == r * 1000 + rank * 10 + i % 7);
	free(mine), free(all);
}

static void bench(unsigned char *tx, unsigned char *rx)
{
	if (size < 2)
		return;
	const size_t lat_sizes[] = { 8, 4096, 65536 };
	for (size_t k = 0; k < 3; k++) {
		size_t n = lat_sizes[k];
		int iters = n <= 4096 ? 5000 : 1000;
		MPI_Barrier(MPI_COMM_WORLD);
		double t0 = MPI_Wtime();
		for (int i = 0; i < iters; i++) {
			if (rank == 0) {
				MPI_Send(tx, (int)n, MPI_BYTE, 1, 1, MPI_COMM_WORLD);
				MPI_Recv(rx, (int)n, MPI_BYTE, 1, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
			} else if (rank == 1) {
				MPI_Recv(rx, (int)n, MPI_BYTE, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
				MPI_Send(tx, (int)n, MPI_BYTE, 0, 1, MPI_COMM_WORLD);
			}
		}
		double t = MPI_Wtime() - t0;
		if (rank == 0)
			printf("bench latency %zu B: %.2f us\n", n, t / iters / 2 * 1e6);
	}
	const size_t bw_sizes[] = { 65536, 1 << 20, 4 << 20 };
	for (size_t k = 0; k < 3; k++) {
		size_t n = bw_sizes[k];
		const int window = 16, reps = n >= (1 << 20) ? 8 : 64;
		MPI_Request reqs[16];
		MPI_Barrier(MPI_COMM_WORLD);
		double t0 = MPI_Wtime();
		for (int r = 0; r < reps; r++) {
			for (int w = 0; w < window; w++) {
				if (rank == 0)
					MPI_Isend(tx, (int)n, MPI_BYTE, 1, 2, MPI_COMM_WORLD, &reqs[w]);
				else if (rank == 1)
					MPI_Irecv(rx, (int)n, MPI_BYTE, 0, 2, MPI_COMM_WORLD, &reqs[w]);
			}
			if (rank < 2)
				MPI_Waitall(window, reqs, MPI_STATUSES_IGNORE);
		}
		if (rank == 0)
			MPI_Recv(rx, 0, MPI_BYTE, 1, 3, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
		else if (rank == 1)
			MPI_Send(tx, 0, MPI_BYTE, 0, 3, MPI_COMM_WORLD);
		double t = MPI_Wtime() - t0;
		if (rank == 0)
			printf("bench bandwidth %zu B: %.1f MB/s\n", n, (double)n * window * reps / t / 1e6);
	}
}

int main(int argc, char **argv)
{
	MPI_Init(&argc, &argv);
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &size);
	unsigned char *tx = malloc(MAX_SIZE), *rx = malloc(MAX_SIZE);
	CHECK(tx && rx);
	CHECK(MPI_Barrier(MPI_COMM_WORLD) == MPI_SUCCESS);
	ring_blocking(tx, rx);
	all_to_all_nonblocking();
	any_source(tx, rx);
	collectives();
	if (argc > 1 && !strcmp(argv[1], "bench"))
		bench(tx, rx);
	CHECK(MPI_Barrier(MPI_COMM_WORLD) == MPI_SUCCESS);
	free(tx), free(rx);
	if (rank == 0)
		printf("mpi: ok (%d ranks)\n", size);
	MPI_Finalize();
	return 0;
}
