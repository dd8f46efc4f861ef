/* The room directory, shown in place of a conversation: a form to create a
 * room (name and optional topic) and the list of all rooms, with Join (or
 * Open, for a room the user is in). */
(function (ChatApp, Backbone, _) {
  'use strict';

  ChatApp.views.RoomDirectoryView = Backbone.View.extend({
    className: 'room-directory',
    template: ChatApp.template('directory-template'),
    roomTemplate: ChatApp.template('directory-room-template'),
    moreTemplate: ChatApp.template('directory-more-template'),

    events: {
      'submit #createRoomForm': 'create',
      'input #roomNameInput': 'typed',
      'click [data-action="join"]': 'join',
      'click [data-action="open"]': 'open',
      'click [data-action="more"]': 'more',
      'click [data-action="close"]': 'close'
    },

    initialize: function (options) {
      this.vent = options.vent;
      this.home = options.home; // to tell the rooms the user is in
      this.listenTo(this.model.rooms, 'update reset change', this.renderRooms);
      this.listenTo(this.home.conversations, 'update', this.renderRooms);
      this.listenTo(this.model, 'change:loading change:more', this.renderMore);
      this.listenTo(this.model, 'change:error', this.renderRooms); // a refused join: its button again
      this.listenTo(this.model, 'change:createError change:creating', this.renderCreate);
    },

    render: function () {
      this.$el.html(this.template({}));
      this.renderCreate();
      this.renderRooms();
      return this;
    },

    shown: function () {
      this.$('#roomNameInput').trigger('focus');
    },

    renderCreate: function () {
      var error = this.model.get('createError');
      this.$('#createRoomError').text(error);
      this.$('#roomNameInput').toggleClass('is-invalid', !!error);
      this.$('#createRoomButton').prop('disabled', !!this.model.get('creating'));
    },

    renderRooms: function () {
      var home = this.home;
      var items = this.model.rooms.map(function (room) {
        var li = document.createElement('li');
        li.className = 'list-group-item dir-room';
        li.dataset.room = room.get('room');
        li.innerHTML = this.roomTemplate(_.extend(room.toJSON(), { member: !!home.room(room.get('room')) }));
        return li;
      }, this);
      this.$('#roomDirectory').empty().append(items);
      this.renderMore();
    },

    renderMore: function () {
      this.$('#roomDirectoryMore').html(this.moreTemplate({
        loading: this.model.get('loading'),
        error: this.model.get('error'),
        more: this.model.get('more'),
        empty: this.model.rooms.length === 0
      }));
    },

    create: function (event) {
      event.preventDefault();
      if (this.model.get('creating')) {
        return;
      }
      var name = String(this.$('#roomNameInput').val() || '').trim();
      var topic = String(this.$('#roomTopicInput').val() || '').trim();
      if (!name) {
        this.model.set('createError', 'Type a name for the room.');
        return;
      }
      this.vent.trigger('createRoom', name, topic);
    },

    typed: function () {
      this.model.set('createError', '');
    },

    roomOf: function (event) {
      var li = event.currentTarget.closest('li');
      return li ? li.dataset.room : null;
    },

    join: function (event) {
      var room = this.roomOf(event);
      if (room) {
        event.currentTarget.disabled = true; // one request per click
        this.vent.trigger('joinRoom', room);
      }
    },

    open: function (event) {
      var room = this.roomOf(event);
      if (room) {
        this.vent.trigger('openRoom', room);
      }
    },

    more: function () {
      this.vent.trigger('moreRooms');
    },

    close: function () {
      this.vent.trigger('closeDirectory');
    }
  });
})(ChatApp, Backbone, _);
