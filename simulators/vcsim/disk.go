package main

// Disk image helpers: sparse-preserving copies, allocated extents and
// block-wise comparison of two images.

import (
	"bytes"
	"errors"
	"io"
	"os"
	"syscall"
)

const (
	seekData = 3 // SEEK_DATA
	seekHole = 4 // SEEK_HOLE
)

// blockSize is the granularity of changed areas.
const blockSize = 64 * 1024

type extent struct {
	start, length int64
}

// dataExtents lists the allocated (data) extents of f within [from, to).
func dataExtents(path string, from, to int64) ([]extent, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []extent
	off := from
	for off < to {
		data, err := f.Seek(off, seekData)
		if err != nil {
			if errors.Is(err, syscall.ENXIO) {
				break // no data after off
			}
			return nil, err
		}
		if data >= to {
			break
		}
		hole, err := f.Seek(data, seekHole)
		if err != nil {
			return nil, err
		}
		if hole > to {
			hole = to
		}
		out = append(out, extent{data, hole - data})
		off = hole
	}
	return out, nil
}

// sparseCopy copies src to dst (created, truncated to src's size) copying
// only the data extents so holes stay holes.
func sparseCopy(src, dst string) error {
	st, err := os.Stat(src)
	if err != nil {
		return err
	}
	size := st.Size()
	exts, err := dataExtents(src, 0, size)
	if err != nil {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := out.Truncate(size); err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for _, e := range exts {
		for off := e.start; off < e.start+e.length; {
			n := int64(len(buf))
			if rest := e.start + e.length - off; rest < n {
				n = rest
			}
			got, err := in.ReadAt(buf[:n], off)
			if err != nil && !errors.Is(err, io.EOF) {
				return err
			}
			if got == 0 {
				break
			}
			if _, err := out.WriteAt(buf[:got], off); err != nil {
				return err
			}
			off += int64(got)
		}
	}
	return out.Sync()
}

// alignExtents widens extents to blockSize boundaries, clips them to
// capacity and merges overlapping/adjacent ones.
func alignExtents(exts []extent, capacity int64) []extent {
	var out []extent
	for _, e := range exts {
		s := e.start / blockSize * blockSize
		end := (e.start + e.length + blockSize - 1) / blockSize * blockSize
		if end > capacity {
			end = capacity
		}
		if end <= s {
			continue
		}
		if n := len(out); n > 0 && out[n-1].start+out[n-1].length >= s {
			if end > out[n-1].start+out[n-1].length {
				out[n-1].length = end - out[n-1].start
			}
			continue
		}
		out = append(out, extent{s, end - s})
	}
	return out
}

// diffBlocks compares images a and b in blockSize blocks within
// [from, to) (from block-aligned) and returns the differing blocks merged,
// clipped at to. Holes in both files are skipped without reading.
func diffBlocks(a, b string, from, to int64) ([]extent, error) {
	fa, err := os.Open(a)
	if err != nil {
		return nil, err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return nil, err
	}
	defer fb.Close()
	// Only blocks where either file has data can differ.
	ea, err := dataExtents(a, from, to)
	if err != nil {
		return nil, err
	}
	eb, err := dataExtents(b, from, to)
	if err != nil {
		return nil, err
	}
	candidates := alignExtents(mergeSorted(ea, eb), to)
	bufA := make([]byte, blockSize)
	bufB := make([]byte, blockSize)
	var changed []extent
	for _, c := range candidates {
		for off := c.start; off < c.start+c.length; off += blockSize {
			n := int64(blockSize)
			if off+n > to {
				n = to - off
			}
			ra, err := readFull(fa, bufA[:n], off)
			if err != nil {
				return nil, err
			}
			rb, err := readFull(fb, bufB[:n], off)
			if err != nil {
				return nil, err
			}
			if bytes.Equal(ra, rb) {
				continue
			}
			if k := len(changed); k > 0 && changed[k-1].start+changed[k-1].length == off {
				changed[k-1].length += n
			} else {
				changed = append(changed, extent{off, n})
			}
		}
	}
	return changed, nil
}

// readFull reads len(buf) bytes at off; bytes past EOF read as zeros.
func readFull(f *os.File, buf []byte, off int64) ([]byte, error) {
	n, err := f.ReadAt(buf, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	for i := n; i < len(buf); i++ {
		buf[i] = 0
	}
	return buf, nil
}

// mergeSorted merges two start-sorted extent lists into one sorted list.
func mergeSorted(a, b []extent) []extent {
	out := make([]extent, 0, len(a)+len(b))
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		if j >= len(b) || (i < len(a) && a[i].start <= b[j].start) {
			out = append(out, a[i])
			i++
		} else {
			out = append(out, b[j])
			j++
		}
	}
	return out
}
