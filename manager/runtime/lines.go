package runtime

import (
	"bytes"
	"sync"
)

// Lines is a writer that hands each line written to it to a function: a
// line ends at \n or at \r, so that a progress bar redrawn in place
// (tqdm's, in vLLM's log) is a line per drawing. A line longer than
// maxLine is cut there. Write is not safe for concurrent use.
type Lines struct {
	line func(string)
	part []byte
}

// maxLine bounds a line Lines keeps: a log line longer than that says
// nothing progress needs past it.
const maxLine = 4096

// NewLines returns a writer that calls line for each line.
func NewLines(line func(string)) *Lines { return &Lines{line: line} }

// Write takes what the server wrote; it never fails.
func (l *Lines) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		i := bytes.IndexAny(p, "\r\n")
		if i < 0 {
			room := maxLine - len(l.part)
			l.part = append(l.part, p[:min(len(p), max(room, 0))]...)
			break
		}
		l.part = append(l.part, p[:min(i, max(maxLine-len(l.part), 0))]...)
		if len(l.part) > 0 {
			l.line(string(l.part))
		}
		l.part = l.part[:0]
		p = p[i+1:]
	}
	return n, nil
}

// Followers hand what a server writes, line by line, to those who follow
// it while they do: a runtime that copies a server's output (sim) writes
// it here too.
type Followers struct {
	mu    sync.Mutex
	lines *Lines
	subs  map[int]func(string)
	next  int
}

// Write takes what the server wrote; it never fails, and never blocks on
// a follower but for its own call.
func (f *Followers) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.subs) == 0 {
		return len(p), nil
	}
	if f.lines == nil {
		f.lines = NewLines(func(s string) {
			for _, sub := range f.subs {
				sub(s)
			}
		})
	}
	return f.lines.Write(p)
}

// Follow calls line for each line written from now on, until the
// returned function is called.
func (f *Followers) Follow(line func(string)) (stop func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.subs == nil {
		f.subs = map[int]func(string){}
	}
	id := f.next
	f.next++
	f.subs[id] = line
	return func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		delete(f.subs, id)
		if len(f.subs) == 0 {
			f.lines = nil // what is written unfollowed is dropped: no half line kept for the next
		}
	}
}
